"""BlockwiseMamba2: parallel == streaming, per-block layout, cache semantics."""

import pytest
import torch
import torch.nn.functional as F

from worldsim.model.blockwise_ssm import (
    BlockwiseMamba2,
    BlockwiseSSMCache,
    blocks_to_tokens,
    cache_nbytes,
    tokens_to_blocks,
)

D_MODEL = 16


def make_layer(grid, block, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_state": 8, "head_dim": 8, "chunk_size": 16, **kw}
    layer = BlockwiseMamba2(D_MODEL, grid=grid, block=block, **kw).to(dtype)
    with torch.no_grad():
        # Mamba2's init leaves D = 1 and a near-identity conv; perturb so every term matters.
        layer.D.add_(torch.randn_like(layer.D))
        layer.conv1d.weight.mul_(3.0)
    return layer


def make_tokens(batch, frames, grid, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, grid[0] * grid[1], D_MODEL, generator=g, dtype=torch.float64).to(dtype)


def stream(layer, x, cache):
    return torch.stack([layer.step(x[:, t], cache) for t in range(x.shape[1])], dim=1)  # (b, T, HW, D)


CASES = [
    ((4, 4), (1, 1)),
    ((4, 4), (2, 2)),
    ((4, 4), (4, 4)),  # no block-wise scan: plain Mamba2 over all tokens
    ((4, 6), (2, 3)),  # non-square grid and block
    ((2, 6), (2, 1)),
    ((3, 5), (3, 5)),
]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("grid,block", CASES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_streaming_equals_parallel(grid, block, dtype):
    layer = make_layer(grid, block, dtype)
    x = make_tokens(2, 6, grid, dtype)
    with torch.no_grad():
        y = layer(x)
        cache = layer.allocate_cache(2)
        y_stream = stream(layer, x, cache)
    assert y.shape == x.shape and y.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y_stream, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_groups,d_conv", [(1, 4), (2, 4), (1, 1), (4, 2)])
def test_one_frame_step_shares_its_frame_and_equals_parallel(n_groups, d_conv):
    """Denoising-style calls on one frame (commit=False) share `begin_step`, leave the cache as it
    was, and the committing call continues the parallel pass; grouped B/C and other conv lengths."""
    grid, block, T, P = (4, 4), (2, 2), 6, 3
    layer = make_layer(grid, block, torch.float64, n_groups=n_groups, d_conv=d_conv, head_dim=4)
    x = make_tokens(2, T, grid, torch.float64)
    probe = make_tokens(2, 1, grid, torch.float64, seed=5)[:, 0]
    with torch.no_grad():
        y = layer(x)
        cache = layer.allocate_cache(2)
        layer(x[:, :P], cache)
        for t in range(P, T):
            frame = layer.begin_step(cache)
            state, conv = cache.ssm_state, cache.conv_state
            first = layer.step(probe, cache, commit=False, frame=frame)
            assert torch.equal(first, layer.step(probe, cache, commit=False, frame=frame))
            assert cache.ssm_state is state and cache.conv_state is conv  # read, never written
            torch.testing.assert_close(first, layer.step(probe, cache.clone()), rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.step(x[:, t], cache, frame=frame), y[:, t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_prefill_then_step_equals_full_forward(dtype):
    grid, block = (4, 6), (2, 2)
    layer = make_layer(grid, block, dtype, chunk_size=None)  # the device default chunk
    x = make_tokens(3, 9, grid, dtype)
    tol = TOLERANCE[dtype]
    with torch.no_grad():
        y_full = layer(x)
        prefilled = layer.allocate_cache(3)
        y_prefix = layer(x[:, :5], prefilled)
        y_rest = stream(layer, x[:, 5:], prefilled)
        # The same cache reached by streaming every frame.
        streamed = layer.allocate_cache(3)
        stream(layer, x, streamed)
    torch.testing.assert_close(torch.cat([y_prefix, y_rest], dim=1), y_full, rtol=tol, atol=tol)
    torch.testing.assert_close(prefilled.ssm_state, streamed.ssm_state, rtol=tol, atol=tol)
    torch.testing.assert_close(prefilled.conv_state, streamed.conv_state, rtol=tol, atol=tol)


def test_two_prefills_chain_like_one():
    layer = make_layer((4, 4), (2, 2), torch.float64, chunk_size=8)
    x = make_tokens(2, 7, (4, 4), torch.float64)
    with torch.no_grad():
        cache = layer.allocate_cache(2)
        y = torch.cat([layer(x[:, :3], cache), layer(x[:, 3:], cache)], dim=1)
        torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-12)


def test_block_must_divide_grid():
    with pytest.raises(ValueError, match=r"block size \(3, 3\) does not divide the token grid \(8, 8\)"):
        BlockwiseMamba2(D_MODEL, grid=(8, 8), block=(3, 3))
    with pytest.raises(ValueError, match="does not divide"):
        BlockwiseMamba2(D_MODEL, grid=(4, 6), block=(4, 4))


def test_bad_inputs_raise_clear_errors():
    layer = make_layer((4, 4), (2, 2))
    with pytest.raises(ValueError, match="H\\*W=16"):
        layer(torch.zeros(1, 2, 15, D_MODEL))
    with pytest.raises(ValueError, match="one frame"):
        layer.step(torch.zeros(1, 2, 16, D_MODEL), layer.allocate_cache(1))
    with pytest.raises(ValueError, match="cache does not fit"):
        layer.step(torch.zeros(2, 16, D_MODEL), layer.allocate_cache(3))
    other = make_layer((4, 4), (1, 1))
    with pytest.raises(ValueError, match="cache does not fit"):
        layer.step(torch.zeros(1, 16, D_MODEL), other.allocate_cache(1))
    with pytest.raises(ValueError, match="head_dim"):
        BlockwiseMamba2(D_MODEL, grid=(4, 4), block=(2, 2), head_dim=12)


def test_token_layout_orders_blocks_then_frames_then_raster():
    # Token value = 100*frame + raster index; grid 2x4, block 2x2: two blocks per frame.
    grid, block = (2, 4), (2, 2)
    x = (100 * torch.arange(3)[:, None] + torch.arange(8)[None, :]).float()  # (T, HW)
    seqs = tokens_to_blocks(x[None, :, :, None], grid, block)[..., 0]  # (n_blocks, T * 4)
    assert seqs.tolist() == [
        [0, 1, 4, 5, 100, 101, 104, 105, 200, 201, 204, 205],
        [2, 3, 6, 7, 102, 103, 106, 107, 202, 203, 206, 207],
    ]
    tokens = make_tokens(2, 3, (4, 6))
    assert torch.equal(blocks_to_tokens(tokens_to_blocks(tokens, (4, 6), (2, 3)), 2, (4, 6), (2, 3)), tokens)
    # Full-grid block: the plain frame-by-frame raster sequence.
    assert torch.equal(tokens_to_blocks(tokens, (4, 6), (4, 6)), tokens.reshape(2, 3 * 24, D_MODEL))


def test_each_block_is_its_own_sequence():
    """The layer on the full grid == the same weights run on each block's tokens alone."""
    grid, block = (4, 6), (2, 3)
    layer = make_layer(grid, block, torch.float64)
    single = make_layer(block, block, torch.float64)
    single.load_state_dict(layer.state_dict())
    x = make_tokens(2, 5, grid, torch.float64)
    with torch.no_grad():
        y = layer(x).reshape(2, 5, *grid, D_MODEL)  # (b, T, H, W, D)
        frames = x.reshape(2, 5, *grid, D_MODEL)
        for i in range(0, grid[0], block[0]):
            for j in range(0, grid[1], block[1]):
                tokens = frames[:, :, i : i + block[0], j : j + block[1]].reshape(2, 5, -1, D_MODEL)
                expected = single(tokens).reshape(2, 5, *block, D_MODEL)
                got = y[:, :, i : i + block[0], j : j + block[1]]
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_perturbing_one_block_only_changes_that_block():
    grid, block = (4, 4), (2, 2)
    layer = make_layer(grid, block, torch.float64)
    x = make_tokens(1, 5, grid, torch.float64)
    x2 = x.clone().reshape(1, 5, 4, 4, D_MODEL)
    x2[:, 0, 0:2, 2:4] += 1.0  # block (0, 1) at frame 0
    with torch.no_grad():
        delta = (layer(x2.reshape(x.shape)) - layer(x)).abs().reshape(1, 5, 4, 4, D_MODEL)
    delta = delta.amax(dim=(0, -1))  # (T, H, W)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[0:2, 2:4] = True
    assert delta[:, ~inside].max() == 0.0  # other blocks: untouched at every time step
    assert (delta[1:, inside].amin(dim=1) > 1e-6).all()  # same block: every later frame moves


def test_output_at_frame_t_ignores_later_frames():
    layer = make_layer((4, 4), (4, 4), torch.float64)
    x = make_tokens(1, 6, (4, 4), torch.float64)
    x2 = x.clone()
    x2[:, 3:] = torch.randn_like(x2[:, 3:])
    with torch.no_grad():
        torch.testing.assert_close(layer(x2)[:, :3], layer(x)[:, :3], rtol=0, atol=0)


def test_cache_size_is_fixed_whatever_the_horizon():
    layer = make_layer((4, 4), (2, 2))
    cache = layer.allocate_cache(3)
    expected = 3 * 4 * (layer.n_heads * layer.head_dim * layer.d_state + layer.conv_dim * (layer.d_conv - 1)) * 4
    assert cache_nbytes(cache) == expected
    with torch.no_grad():
        layer(make_tokens(3, 20, (4, 4)), cache)
        after_20 = cache_nbytes(cache)
        stream(layer, make_tokens(3, 7, (4, 4)), cache)
    assert after_20 == cache_nbytes(cache) == expected
    assert cache_nbytes([cache, cache.clone()]) == 2 * expected


def test_clone_forks_an_independent_stream():
    layer = make_layer((4, 4), (2, 2))
    x = make_tokens(2, 4, (4, 4))
    with torch.no_grad():
        cache = layer.allocate_cache(2)
        layer(x[:, :2], cache)
        fork = cache.clone()
        before = fork.ssm_state.clone()
        y_a = layer.step(x[:, 2], cache)  # advancing the original leaves the fork alone
        assert torch.equal(fork.ssm_state, before)
        y_b = layer.step(x[:, 2], fork)  # and the fork continues exactly like the original did
    assert torch.equal(y_a, y_b)
    assert torch.equal(fork.ssm_state, cache.ssm_state) and torch.equal(fork.conv_state, cache.conv_state)


def test_select_picks_and_repeats_streams():
    layer = make_layer((4, 4), (2, 2))
    x = make_tokens(3, 4, (4, 4))
    with torch.no_grad():
        cache = layer.allocate_cache(3)
        layer(x[:, :3], cache)
        picked = cache.select([2, 2, 0])
        assert isinstance(picked, BlockwiseSSMCache) and picked.batch_size == 3
        y_picked = layer.step(x[[2, 2, 0], 3], picked)
        y_all = layer.step(x[:, 3], cache.clone())
        torch.testing.assert_close(y_picked, y_all[[2, 2, 0]], rtol=0, atol=0)
        masked = cache.select(torch.tensor([True, False, True]))
        torch.testing.assert_close(masked.ssm_state, cache.select([0, 2]).ssm_state, rtol=0, atol=0)
        # Selected caches own their memory.
        picked.ssm_state.zero_()
        assert cache.ssm_state.abs().sum() > 0
    with pytest.raises(IndexError):
        cache.select([3])
    with pytest.raises(ValueError, match="1-D"):
        cache.select(0)


def test_cache_to_changes_dtype():
    layer = make_layer((2, 2), (1, 1))
    cache = layer.allocate_cache(2).to(torch.float64)
    assert cache.ssm_state.dtype == cache.conv_state.dtype == torch.float64
    assert cache_nbytes(cache) == 2 * cache_nbytes(layer.allocate_cache(2))


def test_half_precision_cache_keeps_a_float32_state():
    layer = make_layer((2, 2), (1, 1)).to(torch.bfloat16)
    cache = layer.allocate_cache(1)
    assert cache.ssm_state.dtype == torch.float32 and cache.conv_state.dtype == torch.bfloat16
    with torch.no_grad():
        y = layer.step(make_tokens(1, 1, (2, 2), torch.bfloat16)[:, 0], cache)
    assert y.dtype == torch.bfloat16 and cache.ssm_state.dtype == torch.float32


def test_gradients_reach_every_parameter():
    layer = make_layer((4, 4), (2, 2))
    x = make_tokens(2, 3, (4, 4)).requires_grad_()
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_mamba2_initialisation():
    layer = BlockwiseMamba2(64, grid=(4, 4), block=(2, 2), head_dim=8, dt_min=1e-3, dt_max=0.1)
    dt = F.softplus(layer.dt_bias)
    assert layer.n_heads == 16
    assert ((dt > 1e-3 - 1e-6) & (dt < 0.1 + 1e-6)).all()
    A = -torch.exp(layer.A_log)
    assert ((A <= -1.0) & (A >= -16.0)).all()
    assert torch.equal(layer.D.detach(), torch.ones(16))
    assert all(getattr(p, "_no_weight_decay", False) for p in (layer.A_log, layer.D, layer.dt_bias))
