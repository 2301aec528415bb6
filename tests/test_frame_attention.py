"""Frame-local attention: the three backends against each other, gradients, streaming vs parallel,
causality, cache behaviour and RoPE at long horizons.

FlexAttention runs eagerly here (forward only on CPU, so under no_grad) except in one test that
pays the ~15-20 s torch.compile once.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from worldsim.model.frame_attention import (
    FrameLocalAttention,
    chunked_frame_attention,
    dense_frame_attention,
    flex_frame_attention,
    frame_block_mask,
    frame_window_mask,
    resolve_backend,
)
from worldsim.model.rope import VideoRoPE, apply_rotary, split_rotary_pairs

# FlexAttention warns once that the eager path is unfused; that is the point of using it here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    # Raised inside torch when inductor imports torch.utils.mkldnn; not ours to fix.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

D_MODEL, HEADS = 24, 2  # head_dim 12: RoPE pairs (2, 2, 2)


def make_layer(window, grid=(2, 3), backend="chunked", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = FrameLocalAttention(D_MODEL, HEADS, grid[0] * grid[1], grid, window, backend=backend, flex_compiled=False)
    return layer.to(dtype)


def frames(B, T, N, seed=1, dtype=torch.float64):
    return torch.randn(B, T, N, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -------------------------------------------------------------------------------------------------
# The rule itself
# -------------------------------------------------------------------------------------------------


def test_frame_window_mask_is_the_rule():
    m = frame_window_mask(4, 6, window=2)  # query frames are key frames 2..5
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    assert torch.equal(frame_window_mask(3, 3, None), torch.ones(3, 3).tril().bool())
    assert torch.equal(frame_window_mask(3, 3, 0), torch.eye(3, dtype=torch.bool))


# (Tq, Tk, N, window): Tk > Tq means Tk - Tq cached frames before the queries.
CASES = [
    (7, 7, 6, 0),  # own frame only
    (7, 7, 6, 1),
    (7, 7, 6, 3),  # T not a multiple of the chunk
    (5, 5, 4, 9),  # window >= T
    (6, 6, 4, None),  # causal full
    (5, 9, 4, 2),  # with 4 cached frames
    (5, 8, 3, 6),  # cache shorter than the window
    (1, 6, 4, 3),  # one new frame after a cache
    (4, 11, 5, None),
    (3, 3, 50, 1),  # 150 tokens: not a multiple of FlexAttention's 128-token tiles
]


def qkv(Tq, Tk, N, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, Tq * N, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 3, Tk * N, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 3, Tk * N, 8, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("Tq,Tk,N,window", CASES)
def test_chunked_and_flex_equal_dense(Tq, Tk, N, window):
    q, k, v = qkv(Tq, Tk, N)
    ref = dense_frame_attention(q, k, v, N, window)
    for chunk in (None, 1, 2, 5):  # any chunk size is exact
        out = chunked_frame_attention(q, k, v, N, window, chunk_frames=chunk)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    with torch.no_grad():  # FlexAttention on CPU: forward only, float32
        out = flex_frame_attention(q.float(), k.float(), v.float(), N, window, compiled=False)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("Tq,Tk,N,window", [(9, 9, 48, 2), (5, 12, 40, 4), (7, 7, 32, None), (3, 3, 64, 0)])
def test_block_mask_matches_create_block_mask(Tq, Tk, N, window):
    """The tile classification built from frame intervals equals torch's from the full mask."""
    allowed = frame_window_mask(Tq, Tk, window)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx // N, kv_idx // N]

    ours = frame_block_mask(Tq, Tk, N, window, torch.device("cpu"))
    theirs = create_block_mask(mask_mod, None, None, Tq * N, Tk * N, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)


@pytest.mark.parametrize("Tq,Tk,N,window", [(7, 7, 6, 3), (6, 6, 4, None), (4, 9, 5, 2), (5, 5, 4, 0)])
def test_chunked_gradients_equal_dense(Tq, Tk, N, window):
    ref_in = [t.requires_grad_() for t in qkv(Tq, Tk, N)]
    grad_out = torch.randn(2, 3, Tq * N, 8, dtype=torch.float64)
    ref_grads = torch.autograd.grad(dense_frame_attention(*ref_in, N, window), ref_in, grad_out)
    for chunk in (None, 1, 2):
        out_in = [t.detach().clone().requires_grad_() for t in ref_in]
        out = chunked_frame_attention(*out_in, N, window, chunk_frames=chunk)
        for a, b in zip(torch.autograd.grad(out, out_in, grad_out), ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_compiled_flex_layer_equals_chunked():
    """The one compiled run: the fused CPU kernel, through the layer, on a non-tile-aligned shape."""
    layer = make_layer(window=2, grid=(4, 5), dtype=torch.float32)  # N = 20, L = 7 * 20 = 140
    x = frames(1, 7, 20, dtype=torch.float32)
    with torch.no_grad():
        ref = layer(x)
        layer.backend, layer.flex_compiled = "flex", True
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_flex_forward_and_backward_equal_dense():
    """On CUDA, "auto" trains through compiled FlexAttention: check its gradients too."""
    Tq, Tk, N, window = 6, 9, 40, 3
    ref_in = [t.float().cuda().requires_grad_() for t in qkv(Tq, Tk, N)]
    out_in = [t.detach().clone().requires_grad_() for t in ref_in]
    grad_out = torch.randn(2, 3, Tq * N, 8, device="cuda")
    ref = dense_frame_attention(*ref_in, N, window)
    out = flex_frame_attention(*out_in, N, window)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out, out_in, grad_out), torch.autograd.grad(ref, ref_in, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------
# The layer
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 2, None])
def test_layer_backends_agree_and_backward_runs(window):
    x = frames(2, 6, 6)
    layer = make_layer(window)
    outs = {}
    for backend in ("dense", "chunked", "auto"):
        layer.backend = backend
        outs[backend] = layer(x)
    with torch.no_grad():
        layer.backend = "flex"
        flex = layer(x)  # eager FlexAttention runs in float64 too
    torch.testing.assert_close(outs["chunked"], outs["dense"], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["auto"], outs["dense"], rtol=0, atol=1e-12)
    torch.testing.assert_close(flex, outs["dense"], rtol=0, atol=1e-10)
    outs["auto"].square().sum().backward()  # auto picks chunked on CPU: differentiable
    assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0


def test_auto_backend_rule_and_flex_backward_error():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, needs_grad=True) == "chunked"
    assert resolve_backend("auto", cpu, needs_grad=False) == "chunked"
    assert resolve_backend("auto", cuda, needs_grad=True) == "flex"
    assert resolve_backend("dense", cpu, needs_grad=True) == "dense"
    with pytest.raises(ValueError, match="no backward"):
        resolve_backend("flex", cpu, needs_grad=True)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("sparse", cpu, needs_grad=False)
    layer = make_layer(2, backend="flex")
    with pytest.raises(ValueError, match="no backward"):
        layer(frames(1, 3, 6))


@pytest.mark.parametrize("window", [0, 1, 3, None])
def test_streaming_steps_equal_parallel(window):
    T, N = 9, 6
    layer = make_layer(window)
    x = frames(2, T, N)
    with torch.no_grad():
        ref = layer(x)
        cache = layer.allocate_cache(2)
        streamed = torch.stack([layer.step(x[:, t], cache) for t in range(T)], dim=1)
    torch.testing.assert_close(streamed, ref, rtol=0, atol=1e-12)
    assert cache.frames_seen == T and cache.next_frame == T


@pytest.mark.parametrize("window,prefill", [(3, 2), (3, 5), (None, 4), (0, 3)])
def test_prefill_then_step_and_chunks_equal_full_forward(window, prefill):
    """Prefill a context clip, step a few frames, then feed a multi-frame clip through the (wrapped) ring."""
    T, N = 12, 6
    layer = make_layer(window)
    x = frames(1, T, N)
    with torch.no_grad():
        ref = layer(x)
        cache = layer.allocate_cache(1)
        parts = [layer(x[:, :prefill], cache=cache)]
        parts += [layer.step(x[:, t], cache)[:, None] for t in range(prefill, prefill + 3)]
        parts.append(layer(x[:, prefill + 3 :], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [0, 2, None])
def test_causality(window):
    T, N, t = 8, 6, 5
    layer = make_layer(window)
    x = frames(1, T, N)
    with torch.no_grad():
        base = layer(x)

        def perturbed(frame):
            y = x.clone()
            y[:, frame] += torch.randn_like(y[:, frame])
            return layer(y)

        later = perturbed(t + 1)
        assert torch.equal(later[:, : t + 1], base[:, : t + 1])  # the future never leaks back
        assert not torch.allclose(later[:, t + 1], base[:, t + 1])
        if window is not None:
            assert torch.equal(perturbed(t - window - 1)[:, t], base[:, t])  # just outside the window
            assert not torch.allclose(perturbed(t - window)[:, t], base[:, t])  # oldest frame inside
        else:
            assert not torch.allclose(perturbed(0)[:, t], base[:, t])


def test_cache_memory_constant_for_finite_window_and_growing_for_none():
    N = 6
    finite, unbounded = make_layer(3), make_layer(None)
    x = frames(1, 50, N)
    c3, cn = finite.allocate_cache(1), unbounded.allocate_cache(1)
    sizes3, sizesn = [], []
    with torch.no_grad():
        for t in range(50):
            finite.step(x[:, t], c3)
            unbounded.step(x[:, t], cn)
            sizes3.append(c3.nbytes)
            sizesn.append(cn.nbytes)
    frame_bytes = 2 * HEADS * N * (D_MODEL // HEADS) * 8  # keys + values, float64
    assert set(sizes3) == {3 * frame_bytes}
    assert sizesn == [(t + 1) * frame_bytes for t in range(50)]


def test_cache_clone_select_to():
    N = 6
    layer = make_layer(2)
    x = frames(3, 6, N)
    with torch.no_grad():
        cache = layer.allocate_cache(3)
        layer(x[:, :4], cache=cache)
        fork = cache.clone()
        rows = cache.select([2, 0])
        full = layer.step(x[:, 4], cache)
        # The fork was not touched by stepping the original: it reproduces the same step.
        torch.testing.assert_close(layer.step(x[:, 4], fork), full, rtol=0, atol=0)
        torch.testing.assert_close(layer.step(x[[2, 0], 4], rows), full[[2, 0]], rtol=0, atol=1e-12)
        half = rows.to(dtype=torch.float32)
        assert half.keys.dtype == torch.float32 and half.nbytes * 2 == rows.nbytes
        assert half.frames_seen == rows.frames_seen == 5


def test_rope_far_from_zero_streaming_equals_parallel_and_shift_invariance():
    """At start_frame 1e5: streaming == parallel, and (RoPE being relative) both equal a clip at 0."""
    T, N, start = 6, 6, 100_000
    layer = make_layer(2, dtype=torch.float32)
    x = frames(1, T, N, dtype=torch.float32)
    with torch.no_grad():
        at_zero = layer(x)
        far = layer(x, start_frame=start)
        cache = layer.allocate_cache(1, start_frame=start)
        streamed = torch.stack([layer.step(x[:, t], cache) for t in range(T)], dim=1)
    assert cache.next_frame == start + T
    torch.testing.assert_close(streamed, far, rtol=0, atol=1e-6)
    # Shift invariance holds because the angles are formed in float64 (see the next test).
    torch.testing.assert_close(far, at_zero, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_offsets_only():
    rope = VideoRoPE(head_dim=12, grid=(2, 3))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 12, generator=g), torch.randn(2, 6, 12, generator=g)

    def score(t_q, t_k):
        cq, sq = rope.cos_sin(t_q, 1, "cpu")  # (N, 6)
        ck, sk = rope.cos_sin(t_k, 1, "cpu")
        return apply_rotary(q[0], cq, sq) @ apply_rotary(k[0], ck, sk).T  # (N, N)

    # Angles formed in float32 are off by ~1e-4 rad at t = 250000 and fail this; float64 ones agree to ~1e-6.
    torch.testing.assert_close(score(7, 3), score(250_007, 250_003), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))
    assert split_rotary_pairs(32) == (6, 5, 5)
    with pytest.raises(ValueError):
        VideoRoPE(head_dim=12, grid=(2, 3), pairs=(3, 2, 2))


def test_bad_inputs_raise_clear_errors():
    layer = make_layer(2)
    with pytest.raises(ValueError, match="N=6"):
        layer(torch.zeros(1, 3, 5, D_MODEL, dtype=torch.float64))
    with pytest.raises(ValueError, match="grid"):
        FrameLocalAttention(D_MODEL, HEADS, 7, (2, 3), 2)
    cache = make_layer(3).allocate_cache(1)
    with pytest.raises(ValueError, match="does not match"):
        layer.step(torch.zeros(1, 6, D_MODEL, dtype=torch.float64), cache)
    cache = layer.allocate_cache(1, start_frame=10)
    with pytest.raises(ValueError, match="continues at frame 10"):
        layer(torch.zeros(1, 2, 6, D_MODEL, dtype=torch.float64), cache=cache, start_frame=0)
    with pytest.raises(ValueError, match="does not match"):  # a wrong batch is an error, not a broadcast
        layer.step(torch.zeros(2, 6, D_MODEL, dtype=torch.float64), cache)
