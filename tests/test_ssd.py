"""The chunked SSD scan against the slow references in worldsim.model.ssd_reference."""

import logging

import pytest
import torch
import torch.nn.functional as F

from worldsim.model import ssd
from worldsim.model.ssd import resolve_backend, run_fla, segment_sum, ssd_chunked, ssd_chunked_torch, ssd_one_chunk
from worldsim.model.ssd_reference import ssd_quadratic, ssd_recurrent


def make_inputs(batch, length, heads, head_dim, groups, d_state, dtype=torch.float64, seed=0, a_scale=2.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x = randn(batch, length, heads, head_dim)
    dt = F.softplus(randn(batch, length, heads) - 1.0)
    A = -(torch.rand(heads, generator=g, dtype=torch.float64) * a_scale + 0.05).to(dtype)
    B = randn(batch, length, groups, d_state)
    C = randn(batch, length, groups, d_state)
    h0 = randn(batch, heads, head_dim, d_state)
    return x, dt, A, B, C, h0


# (batch, length, heads, head_dim, groups, d_state, chunk): lengths that are and are not
# multiples of the chunk, a chunk longer than the sequence, one-token chunks, grouped B/C.
SIZES = [
    (2, 37, 4, 8, 1, 16, 8),
    (1, 64, 2, 4, 1, 4, 64),
    (3, 5, 2, 3, 2, 7, 64),
    (1, 100, 6, 4, 3, 5, 16),
    (2, 23, 4, 2, 4, 3, 1),
    (1, 130, 1, 16, 1, 32, 32),
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "b{}_L{}_h{}_p{}_g{}_n{}_q{}".format(*s))
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_matches_recurrence_and_quadratic_float64(size, with_initial_state):
    batch, length, heads, head_dim, groups, d_state, chunk = size
    x, dt, A, B, C, h0 = make_inputs(batch, length, heads, head_dim, groups, d_state)
    h0 = h0 if with_initial_state else None

    y, final = ssd_chunked(x, dt, A, B, C, chunk, initial_state=h0)
    y_rec, final_rec = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
    y_quad, final_quad = ssd_quadratic(x, dt, A, B, C, initial_state=h0)

    assert y.shape == (batch, length, heads, head_dim) and y.dtype == torch.float64
    assert final.shape == (batch, heads, head_dim, d_state)
    torch.testing.assert_close(y, y_rec, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_rec, rtol=0, atol=1e-10)
    torch.testing.assert_close(y_quad, y_rec, rtol=0, atol=1e-10)
    torch.testing.assert_close(final_quad, final_rec, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [16, 64])
def test_float32_close_to_float64_reference(chunk):
    x, dt, A, B, C, h0 = make_inputs(2, 150, 4, 8, 2, 16)
    y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
    y, final = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), chunk, initial_state=h0.float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)


def test_strong_decay_stays_finite_and_accurate_in_float32():
    # dt*A down to about -400 per token: any exp of an un-negated or cancelled log sum would
    # overflow or lose the small decays. Early tokens decay hard, late ones barely.
    x, dt, A, B, C, h0 = make_inputs(1, 96, 2, 4, 1, 8, a_scale=80.0)
    dt[:, :48] = dt[:, :48] * 5.0
    dt[:, 48:] = dt[:, 48:] * 1e-3
    y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
    y, final = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), 64, initial_state=h0.float())
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)


def test_resuming_from_final_state_equals_one_long_scan():
    x, dt, A, B, C, h0 = make_inputs(2, 90, 4, 4, 2, 8)
    y_full, final_full = ssd_chunked(x, dt, A, B, C, 16, initial_state=h0)
    split = 37
    y1, mid = ssd_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], 16, initial_state=h0)
    y2, final = ssd_chunked(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], 16, initial_state=mid)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, final_full, rtol=0, atol=1e-12)


def test_gradients_match_the_recurrence():
    inputs = [t.requires_grad_() for t in make_inputs(2, 21, 2, 3, 1, 4)]
    x, dt, A, B, C, h0 = inputs
    w_y = torch.randn(2, 21, 2, 3, dtype=torch.float64)
    w_f = torch.randn(2, 2, 3, 4, dtype=torch.float64)

    def loss(fn, *args):
        y, final = fn(*args)
        return (y * w_y).sum() + (final * w_f).sum()

    grads = torch.autograd.grad(loss(ssd_chunked, x, dt, A, B, C, 8, h0), inputs)
    grads_ref = torch.autograd.grad(loss(ssd_recurrent, x, dt, A, B, C, h0), inputs)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_backward_is_finite_in_float32_with_padding():
    x, dt, A, B, C, _ = (t.float().requires_grad_() for t in make_inputs(2, 77, 4, 8, 1, 16, a_scale=30.0))
    y, final = ssd_chunked(x, dt, A, B, C, 32)
    (y.square().mean() + final.square().mean()).backward()
    for t in (x, dt, A, B, C):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32():
    x, dt, A, B, C, _ = make_inputs(1, 40, 2, 8, 1, 8, dtype=torch.float32)
    y32, _ = ssd_chunked(x, dt, A, B, C, 16)
    y16, final16 = ssd_chunked(*(t.bfloat16() for t in (x, dt, A, B, C)), 16)
    assert y16.dtype == torch.bfloat16 and final16.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


def test_segment_sum():
    a = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    s = segment_sum(a)
    inf = float("-inf")
    expected = torch.tensor(
        [[0, inf, inf, inf], [2, 0, inf, inf], [6, 4, 0, inf], [14, 12, 8, 0]], dtype=torch.float64
    )
    assert torch.equal(s, expected)


def test_segment_sum_equals_masked_fills_bit_for_bit():
    """The 0/1 and 0/-inf mask form computes exactly what masked fills of a cumsum would (the
    training scan uses it: a pure refactor must not change a bit)."""
    a = -torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4
    q = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, q).masked_fill(~torch.ones(q, q, dtype=torch.bool).tril(-1), 0.0)
    expected = rows.cumsum(dim=-2).masked_fill(~torch.ones(q, q, dtype=torch.bool).tril(), float("-inf"))
    assert torch.equal(segment_sum(a), expected)


# (batch, length, heads, head_dim, groups, d_state): a streamed frame's block tokens (4 of a 2x2
# block, 16 of a 4x4 grid), one token, grouped B/C.
ONE_CHUNK_SIZES = [(4, 4, 4, 32, 1, 16), (2, 16, 4, 8, 1, 5), (3, 1, 2, 3, 1, 4), (2, 6, 6, 4, 3, 5),
                   (1, 5, 4, 2, 2, 3)]


@pytest.mark.parametrize("size", ONE_CHUNK_SIZES, ids=lambda s: "b{}_L{}_h{}_p{}_g{}_n{}".format(*s))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_one_chunk_form_equals_the_chunked_scan(size, dtype, tol):
    """The streaming step's scan: the same outputs and final state as the chunked scan from the
    same initial state, and no final state when not asked for."""
    batch, length, heads, head_dim, groups, d_state = size
    x, dt, A, B, C, h0 = make_inputs(batch, length, heads, head_dim, groups, d_state, dtype=dtype)
    y_ref, final_ref = ssd_chunked_torch(x, dt, A, B, C, 4, initial_state=h0)  # several chunks when L > 4
    y, final = ssd_one_chunk(x, dt, A, B, C, h0)
    assert y.dtype == dtype and final.shape == (batch, heads, head_dim, d_state)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(final, final_ref, rtol=tol, atol=tol)
    y_only, none = ssd_one_chunk(x, dt, A, B, C, h0, final_state=False)
    assert none is None and torch.equal(y_only, y)
    bf16, final16 = ssd_one_chunk(*(t.bfloat16() for t in (x, dt, A, B, C)), h0.float())
    assert bf16.dtype == torch.bfloat16 and final16.dtype == torch.float32


def test_bad_shapes_raise_clear_errors():
    x, dt, A, B, C, h0 = make_inputs(1, 10, 4, 2, 1, 3)
    with pytest.raises(ValueError, match="A must be"):
        ssd_chunked(x, dt, A[:2], B, C, 4)
    with pytest.raises(ValueError, match="multiple of the B/C groups"):
        ssd_chunked(x, dt, A, B.expand(-1, -1, 3, -1), C.expand(-1, -1, 3, -1), 4)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, 4, initial_state=h0[..., :2])
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(x, dt[:, :5], A, B, C, 4)


def test_backend_selection_on_cpu():
    x = torch.zeros(1, 4, 2, 2)
    assert resolve_backend(x) == "torch"
    assert resolve_backend(x, "torch") == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend(x, "mamba_ssm")
    with pytest.raises(ValueError, match="unknown SSD backend"):
        resolve_backend(x, "triton")


def test_path_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(ssd, "_logged_paths", set())
    x, dt, A, B, C, _ = make_inputs(1, 8, 2, 2, 1, 2)
    with caplog.at_level(logging.INFO, logger="worldsim.model.ssd"):
        ssd_chunked(x, dt, A, B, C, 4)
        ssd_chunked(x, dt, A, B, C, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "worldsim.model.ssd"]
    assert len(lines) == 1 and "pure-PyTorch" in lines[0]


def fake_chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, head_first=True):
    """flash-linear-attention's simple-GLA contract, written as a loop: S_t = exp(g_t) S_{t-1} +
    k_t v_t^T, o_t = scale q_t S_t, state (batch, heads, K, V). Defaults to head-first like old
    releases, so the adapter must ask for (batch, T, heads, dim)."""
    if head_first:
        q, k, v, g = (t.transpose(1, 2) for t in (q, k, v, g))
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3]) if initial_state is None else initial_state
    outs = []
    for t in range(q.shape[1]):
        state = torch.exp(g[:, t])[..., None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outs, dim=1)
    return (o.transpose(1, 2) if head_first else o), (state if output_final_state else None)


def test_fla_adapter_maps_layouts_correctly():
    x, dt, A, B, C, h0 = make_inputs(2, 19, 4, 3, 2, 5)
    y, final = run_fla(fake_chunk_simple_gla, x, dt, A, B, C, 64, h0)
    y_ref, final_ref = ssd_chunked_torch(x, dt, A, B, C, 8, h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-10)


def test_the_compiled_path_sums_without_cumsum_and_agrees(monkeypatch):
    # While torch.compile traces, prefix sums run as float32 matmuls (Inductor's scan codegen
    # failed on the H100): the same scans, also where strong decays would make a difference of
    # prefix sums lose the small ones.
    cases = [make_inputs(2, 150, 4, 8, 2, 16), make_inputs(1, 96, 2, 4, 1, 8, a_scale=80.0)]
    cases[1][1][:, :48] *= 5.0
    cases[1][1][:, 48:] *= 1e-3
    eager = [ssd_chunked_torch(*(t.float() for t in (x, dt, A, B, C)), 64, initial_state=h0.float())
             for x, dt, A, B, C, h0 in cases]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.Tensor, "cumsum", lambda *a, **k: pytest.fail("cumsum on the compiled path"))
    for (x, dt, A, B, C, h0), (y_eager, final_eager) in zip(cases, eager, strict=True):
        y_ref, final_ref = ssd_recurrent(x, dt, A, B, C, initial_state=h0)
        y, final = ssd_chunked_torch(*(t.float() for t in (x, dt, A, B, C)), 64, initial_state=h0.float())
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        ys, fs = ssd_one_chunk(*(t.float() for t in (x[:, :40], dt[:, :40], A, B[:, :40], C[:, :40])), h0.float())
        ys_ref, fs_ref = ssd_recurrent(x[:, :40], dt[:, :40], A, B[:, :40], C[:, :40], initial_state=h0)
        torch.testing.assert_close(ys.double(), ys_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fs.double(), fs_ref, rtol=1e-4, atol=1e-4)
