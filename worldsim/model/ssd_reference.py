"""Slow, obviously-correct SSD (Mamba2) scans, used only to test the fast ones.

Both functions compute the same map as `worldsim.model.ssd.ssd_chunked`, with the same argument
conventions (see its docstring):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        h: (head_dim, d_state) per head
    y_t = h_t C_t

`ssd_recurrent` runs that recurrence one token at a time. `ssd_quadratic` is the "attention" dual
form from the Mamba2 paper (y = (L o C B^T) (x dt) with the full L x L decay mask materialised).
Run them in float64 for tight comparisons.
"""

from __future__ import annotations

import torch


def _heads_from_groups(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(batch, L, groups, d_state) -> (batch, L, heads, d_state); head h reads group h // (H / G)."""
    return t.repeat_interleave(n_heads // t.shape[2], dim=2)


def ssd_recurrent(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence. Returns (y (batch, L, heads, head_dim), final state)."""
    batch, length, n_heads, head_dim = x.shape
    B = _heads_from_groups(B, n_heads)  # (b, L, h, n)
    C = _heads_from_groups(C, n_heads)  # (b, L, h, n)
    state = x.new_zeros(batch, n_heads, head_dim, B.shape[-1])
    if initial_state is not None:
        state = initial_state.to(x.dtype).clone()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1), state  # (b, L, h, p), (b, h, p, n)


def ssd_quadratic(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised dual form, O(L^2). Returns (y, final state) like `ssd_recurrent`."""
    batch, length, n_heads, head_dim = x.shape
    B = _heads_from_groups(B, n_heads)  # (b, L, h, n)
    C = _heads_from_groups(C, n_heads)  # (b, L, h, n)
    log_a = (dt * A).transpose(1, 2)  # (b, h, L)
    cum = torch.cumsum(log_a, dim=-1)  # (b, h, L): log decay from the start through token t
    # decay[t, s] = exp(sum_{k=s+1..t} log_a_k) for s <= t. Written as a difference of cumsums,
    # which is fine in float64 for the short sequences the tests use.
    diff = cum[..., :, None] - cum[..., None, :]  # (b, h, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))  # (b, h, L, L)
    scores = torch.einsum("bthn,bshn->bhts", C, B) * decay  # (b, h, L, L)
    y = torch.einsum("bhts,bshp->bthp", scores, x * dt[..., None])  # (b, L, h, p)
    to_end = torch.exp(cum[..., -1:] - cum)  # (b, h, L): decay from token s to the last token
    final = torch.einsum("bhs,bshn,bshp->bhpn", to_end, B, x * dt[..., None])  # (b, h, p, n)
    if initial_state is not None:
        h0 = initial_state.to(x.dtype)
        y = y + torch.einsum("bthn,bhpn,bht->bthp", C, h0, torch.exp(cum))
        final = final + torch.exp(cum[..., -1])[..., None, None] * h0
    return y, final
