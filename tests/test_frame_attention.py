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


@pytest.mark.parametrize("qk_norm", [True, False])
def test_one_frame_step_shares_its_frame_and_equals_parallel(qk_norm):
    """Denoising-style calls on one frame (commit=False) share `begin_step`'s buffers and tables,
    leave the cache as it was, and the committing call equals the parallel pass over the clip; with
    non-trivial q/k norm weights (folded into the RoPE tables) and without qk-norm."""
    T, N, P = 7, 6, 4
    torch.manual_seed(0)
    layer = FrameLocalAttention(D_MODEL, HEADS, N, (2, 3), 3, backend="chunked", qk_norm=qk_norm).double()
    if qk_norm:
        with torch.no_grad():
            layer.q_norm.weight.normal_(1, 0.5)
            layer.k_norm.weight.normal_(1, 0.5)
    x = frames(2, T, N)
    probe = torch.randn(2, N, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x)
        cache = layer.allocate_cache(2)
        layer(x[:, :P], cache=cache)
        for t in range(P, T):
            frame = layer.begin_step(cache)
            first = layer.step(probe, cache, commit=False, frame=frame)
            again = layer.step(probe, cache, commit=False, frame=frame)  # the buffer's last slot is overwritten
            assert torch.equal(first, again) and cache.frames_seen == t
            torch.testing.assert_close(first, layer.step(probe, cache.clone()), rtol=0, atol=1e-12)
            out = layer.step(x[:, t], cache, frame=frame)  # commit
            torch.testing.assert_close(out, ref[:, t], rtol=0, atol=1e-12)
    assert cache.frames_seen == T


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


def test_rope_tables_are_cached_per_frame_and_equal_fresh_ones():
    """A streamed frame reuses its table across denoiser calls; the cache stays small and every
    table equals one built from scratch."""
    rope = VideoRoPE(head_dim=12, grid=(2, 3))
    first = rope.cos_sin(41, 1, "cpu")
    assert rope.cos_sin(41, 1, "cpu")[0].data_ptr() == first[0].data_ptr()  # same frame again: no rebuild
    for t in range(50):
        cos, sin = rope.cos_sin(t, 3, "cpu")
        fresh_cos, fresh_sin = VideoRoPE(head_dim=12, grid=(2, 3)).cos_sin(t, 3, "cpu")
        assert torch.equal(cos, fresh_cos) and torch.equal(sin, fresh_sin)
    assert len(rope._table_cache) <= 8
    assert torch.equal(rope.cos_sin(41, 1, "cpu")[0], first[0])  # rebuilt after eviction, same values
    assert rope.cos_sin(41, 1, "cpu", torch.float64)[0].dtype == torch.float64
    # Streams at different frames get one table each, built together, equal to their own tables.
    cos, sin = rope.cos_sin_rows([3, 250_000, 3], 2, "cpu")  # (3, 2 N, 6)
    for row, start in enumerate([3, 250_000, 3]):
        one_cos, one_sin = VideoRoPE(head_dim=12, grid=(2, 3)).cos_sin(start, 2, "cpu")
        assert torch.equal(cos[row], one_cos) and torch.equal(sin[row], one_sin)


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


# -------------------------------------------------------------------------------------------------
# Rows restarted on their own (assign)
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [3, None])
def test_assign_restarts_one_row_with_a_short_context(window):
    """Row 1 of a running batch restarts from a 1-frame context (shorter than the window); then
    every row's steps and a multi-frame clip equal a parallel pass over that row's own stream."""
    N, P, K = 6, 5, 6
    layer = make_layer(window)
    x, z, y = frames(2, P, N, seed=1), frames(1, 1, N, seed=2), frames(2, K + 2, N, seed=3)
    with torch.no_grad():
        cache = layer.allocate_cache(2)
        layer(x, cache=cache)
        fresh = layer.allocate_cache(1)
        layer(z, cache=fresh)
        cache.assign([1], fresh)
        assert cache.next_frames.tolist() == [P, 1] and cache.valid.tolist() == [P if window is None else 3, 1]
        streamed = [layer.step(y[:, t], cache)[:, None] for t in range(K)]  # the short context ages out
        streamed.append(layer(y[:, K:], cache=cache))  # a clip continuing the rows: the masked path
        streamed = torch.cat(streamed, dim=1)
        ref0 = layer(torch.cat([x[:1], y[:1]], dim=1))[:, P:]
        ref1 = layer(torch.cat([z, y[1:]], dim=1))[:, 1:]
        # The clip path while the rows still hold different counts of frames (window=None keeps them).
        mixed = layer.allocate_cache(2)
        layer(x, cache=mixed)
        mixed.assign([1], fresh)
        clip = layer(y, cache=mixed)
    torch.testing.assert_close(streamed[:1], ref0, rtol=0, atol=1e-12)
    torch.testing.assert_close(streamed[1:], ref1, rtol=0, atol=1e-12)
    torch.testing.assert_close(clip, torch.cat([ref0, ref1]), rtol=0, atol=1e-12)
    assert cache.next_frames.tolist() == [P + K + 2, 1 + K + 2]
    if window is not None:
        assert cache.rows_aligned  # both rows hold the full ring again: back on the mask-free path


def test_assign_keeps_each_rows_own_positions_select_and_clone():
    """A restarted row's keys carry its own RoPE positions (as a stream started alone), and
    select / clone of a cache whose rows hold different frames behave like the rows alone."""
    N, window = 6, 4
    layer = make_layer(window)
    x, z, y = frames(3, 5, N, seed=1), frames(1, 2, N, seed=2), frames(3, 2, N, seed=3)
    with torch.no_grad():
        cache = layer.allocate_cache(3)
        layer(x, cache=cache)
        fresh = layer.allocate_cache(1, start_frame=100)  # e.g. a stream resumed far into an episode
        layer(z, cache=fresh)
        alone = fresh.clone()
        cache.assign([2], fresh)
        picked = cache.select([2, 2, 0])
        fork = cache.clone()
        out = layer.step(y[:, 0], cache)
        assert torch.equal(layer.step(y[:, 0], fork), out)  # the fork was not touched by the step
        out_alone = layer.step(y[2:, 0], alone)
        # Row 2 holds exactly the keys (rotated at frames 100..102) of the stream run alone.
        keys, _, held = cache.past(in_order=True)  # (3, H, 4 N, D), (3, 4)
        assert held[2].tolist() == [False, True, True, True]
        assert torch.equal(keys[2, :, N:], alone.past(in_order=True)[0][0])
        assert cache.next_frames.tolist() == [6, 6, 103] and cache.valid.tolist() == [4, 4, 3]
        torch.testing.assert_close(out[2:], out_alone, rtol=0, atol=1e-12)
        out_picked = layer.step(y[[2, 2, 0], 0], picked)
    torch.testing.assert_close(out_picked, out[[2, 2, 0]], rtol=0, atol=1e-12)
    assert picked.next_frames.tolist() == [103, 103, 6] and picked.valid.tolist() == [3, 3, 4]
    with pytest.raises(ValueError, match="different frames"):
        cache.next_frame


def test_assign_grows_and_trims_an_unbounded_cache():
    N = 6
    layer = make_layer(None)
    frame_bytes = 2 * HEADS * N * (D_MODEL // HEADS) * 8  # keys + values of one frame of one row, float64
    with torch.no_grad():
        cache = layer.allocate_cache(2)
        layer(frames(2, 2, N), cache=cache)
        long = layer.allocate_cache(1)
        layer(frames(1, 5, N, seed=2), cache=long)
        cache.assign([0], long)  # longer than the batch's history: room is made on the old side
        assert cache.nbytes == 2 * 5 * frame_bytes and cache.valid.tolist() == [5, 2]
        y = frames(2, 1, N, seed=3)
        out = layer.step(y[:, 0], cache)
        ref = layer(torch.cat([frames(1, 5, N, seed=2), y[:1]], dim=1))[:, -1]
        short = layer.allocate_cache(1)
        layer(frames(1, 1, N, seed=4), cache=short)
        cache.assign([0], short)  # nobody holds the 3 oldest slots any more: they are dropped
        assert cache.nbytes == 2 * 3 * frame_bytes and cache.valid.tolist() == [1, 3]
    torch.testing.assert_close(out[:1], ref, rtol=0, atol=1e-12)


def test_assign_bad_inputs_raise_clear_errors():
    layer = make_layer(2)
    cache, one = layer.allocate_cache(3), layer.allocate_cache(1)
    with pytest.raises(ValueError, match="one per row"):
        cache.assign([0, 1], one)
    with pytest.raises(ValueError, match="distinct"):
        cache.assign([1, 1], layer.allocate_cache(2))
    with pytest.raises(IndexError, match="out of range"):
        cache.assign([3], one)
    with pytest.raises(ValueError, match="window"):
        cache.assign([0], make_layer(3).allocate_cache(1))
