"""Chunked SSD scan (Mamba2, Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060).

The map computed, per head, with a scalar decay per token (what makes it "SSD"):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        h_t: (head_dim, d_state)
    y_t = h_t C_t

The sequence is cut into chunks of Q tokens. Inside a chunk the map is a small masked matmul
(the quadratic "attention" form); across chunks only the (head_dim, d_state) states are passed on,
so the cost is O(L Q) instead of O(L^2) and nothing loops over tokens in Python.

Numerics: every decay is exp of a sum of dt*A <= 0, so nothing can overflow. Segment sums
sum_{k=s+1..t} dt_k A are built by a masked cumsum (never as a difference of two long cumsums,
which cancels badly in float32 when the decays are large).

On CUDA the Triton kernels of `mamba-ssm` (else `flash-linear-attention`) are used when
installed; everywhere else the pure-PyTorch path runs. The first call of each path says which
one in the log (logger `worldsim.model.ssd`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "mamba_ssm", "fla")
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged_paths: set[str] = set()


# ---------------------------------------------------------------------------------------------
# Pure PyTorch
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _segment_masks(q: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, Q) masks of `segment_sum`, built once per size (every layer and call asks for the same):
    1 strictly below the diagonal and 0 elsewhere; 0 on and below it and -inf above. Never modify them."""
    with torch.inference_mode(False):  # filled during a dream's inference-mode call, it must serve training too
        ones = torch.ones(q, q, dtype=torch.bool, device=device)
        below = ones.tril(-1).to(dtype)
        above = torch.zeros(q, q, dtype=dtype, device=device).masked_fill(~ones.tril(), float("-inf"))
    return below, above


def prefix_sum(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """a.cumsum(dim).

    While torch.compile traces (the GPU job), a float32 matmul with a triangular 0/1 matrix
    instead: Inductor's scan code generation failed on this cumsum on the H100 (torch 2.11, a
    TypeError in SplitScan), which cost two leases their compiled training. It is the same sum in
    another order (no cancelling terms), kept out of bf16 autocast: log decays must not be rounded
    to 8 bits.
    """
    if not torch.compiler.is_compiling():
        return a.cumsum(dim=dim)
    last = a.movedim(dim, -1)  # (..., Q)
    q = last.shape[-1]
    upper = torch.ones(q, q, dtype=torch.bool, device=a.device).triu().to(torch.float32)  # [s, t] = 1 for s <= t
    with torch.autocast(a.device.type, enabled=False):
        return (last.float() @ upper).to(a.dtype).movedim(-1, dim)


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """out[..., t, s] = a[..., s+1] + ... + a[..., t] for s <= t (0 on the diagonal), -inf above.

    a: (..., Q) finite -> (..., Q, Q). exp(out) is the lower-triangular decay matrix of a scan
    whose per-step log decay is `a`.
    """
    below, above = _segment_masks(a.shape[-1], a.device, a.dtype)
    # Row t, column s holds a[t] where t > s (times 1; 0 elsewhere); a cumsum down the rows then
    # adds exactly the steps s+1..t, with no subtraction of large partial sums. Multiplying by the
    # 0/1 mask and adding the 0/-inf one give what masked fills would, in two cheap ops.
    return prefix_sum(a[..., :, None] * below, dim=-2) + above  # (..., Q, Q)


def _check_shapes(x, dt, A, B, C, initial_state) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got shape {tuple(x.shape)}")
    batch, length, n_heads, head_dim = x.shape
    if length == 0:
        raise ValueError("x has sequence length 0")
    if dt.shape != (batch, length, n_heads):
        raise ValueError(f"dt must be (batch, length, heads) = {(batch, length, n_heads)}, got {tuple(dt.shape)}")
    if A.shape != (n_heads,):
        raise ValueError(f"A must be (heads,) = ({n_heads},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be (batch, length, groups, d_state) with batch={batch}, length={length}; "
            f"got B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if n_heads % B.shape[2] != 0:
        raise ValueError(f"heads ({n_heads}) must be a multiple of the B/C groups ({B.shape[2]})")
    expected = (batch, n_heads, head_dim, B.shape[3])
    if initial_state is not None and initial_state.shape != expected:
        raise ValueError(
            f"initial_state must be (batch, heads, head_dim, d_state) = {expected}, got {tuple(initial_state.shape)}"
        )


def ssd_chunked_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch chunked SSD; same contract as `ssd_chunked`. Runs on any device and dtype."""
    _check_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = x.dtype
    # Half precision cannot hold the decays and state sums of a long scan: compute in >= float32.
    cdt = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))

    batch, length, n_heads, head_dim = x.shape
    n_groups, d_state = B.shape[2], B.shape[3]
    hpg = n_heads // n_groups  # heads per group: heads g*hpg .. g*hpg+hpg-1 share B_g, C_g
    q = min(chunk_size, length)  # a chunk longer than the sequence only adds padding
    n_chunks = -(-length // q)
    pad = n_chunks * q - length
    if pad:
        # Padded steps get dt = 0: decay exp(0) = 1 and input 0, so the final state is the state
        # after the last real token, and the padded outputs are cut off below.
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))  # (b, Lp, ., .)
        dt = F.pad(dt, (0, 0, 0, pad))  # (b, Lp, h)

    # Work head-major inside each chunk, (b, c, g, j, l, ...), so the (Q x Q) tensors are built
    # in the layout the matmuls want and never permuted; only x, y and small tensors are moved.
    xdt = (x * dt[..., None]).view(batch, n_chunks, q, n_groups, hpg, head_dim)  # (b, c, l, g, j, p)
    xdt = xdt.permute(0, 1, 3, 4, 2, 5)  # (b, c, g, j, l, p)
    B = B.view(batch, n_chunks, q, n_groups, 1, d_state).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, 1, l, n)
    C = C.view(batch, n_chunks, q, n_groups, 1, d_state).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, 1, l, n)
    log_a = (dt * A).view(batch, n_chunks, q, n_groups, hpg).permute(0, 1, 3, 4, 2)  # (b, c, g, j, l)
    cum = prefix_sum(log_a)  # (b, c, g, j, l): log decay from chunk start through token l
    decay = torch.exp(segment_sum(log_a))  # (b, c, g, j, l, s)

    # 1. Within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(seg[l, s]) x_s dt_s.
    scores = (C @ B.transpose(-1, -2)) * decay  # (b, c, g, j, l, s)
    y = scores @ xdt  # (b, c, g, j, l, p)

    # 2. State each chunk adds by its end: the decay from token s to the chunk's last token is
    #    the last row of the decay matrix (no cancelling difference of cumsums).
    to_end = decay[..., -1, :, None]  # (b, c, g, j, l, 1)
    chunk_states = (xdt * to_end).transpose(-1, -2) @ B  # (b, c, g, j, p, n)

    # 3. Pass states across chunks: the state entering chunk z is sum_{c<z} decay(c->z) *
    #    chunk_states[c] plus the decayed initial state, again a small masked matmul (over chunks).
    if initial_state is None:
        h0 = chunk_states.new_zeros(batch, 1, n_groups, hpg, head_dim, d_state)
    else:
        h0 = initial_state.to(cdt).reshape(batch, 1, n_groups, hpg, head_dim, d_state)  # (b, 1, g, j, p, n)
    if n_chunks == 1:
        # One chunk (a streamed frame's block tokens): the matmul over chunks reduces to the
        # initial state decayed over the chunk plus what the chunk adds; ~2x faster at such sizes.
        carried = h0  # (b, 1, g, j, p, n)
        final = h0[:, 0] * torch.exp(cum[:, 0, ..., -1])[..., None, None] + chunk_states[:, 0]  # (b, g, j, p, n)
    else:
        states = torch.cat([h0, chunk_states], dim=1)  # (b, c+1, g, j, p, n)
        chunk_log_a = F.pad(cum[..., -1].permute(0, 2, 3, 1), (1, 0))  # (b, g, j, c+1): 0 for h0
        across = torch.exp(segment_sum(chunk_log_a))  # (b, g, j, c+1, c+1)
        states = torch.einsum("bgjzc,bcgjpn->bzgjpn", across, states)  # (b, c+1, g, j, p, n)
        carried, final = states[:, :-1], states[:, -1]  # (b, c, g, j, p, n), (b, g, j, p, n)

    # 4. What the carried-in state adds to each token: C_l . (exp(cum_l) h_in).
    y = y + (C @ carried.transpose(-1, -2)) * torch.exp(cum)[..., None]  # (b, c, g, j, l, p)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, n_chunks * q, n_heads, head_dim)[:, :length]  # (b, L, h, p)
    return y.to(out_dtype), final.reshape(batch, n_heads, head_dim, d_state)  # (b, h, p, n)


def ssd_one_chunk(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ssd_chunked_torch` on sequences taken as one chunk, from a given state: the streaming step's
    scan (a streamed frame's few block tokens). Same formulas, so the same result up to float
    rounding, in fewer ops: no padding, no pass across chunks, plain batched matmuls, and the final
    state only when asked for (a denoising step reads the state and never writes it back).

    x (b, L, h, p), dt (b, L, h), A (h,), B, C (b, L, g, n), initial_state (b, h, p, n) ->
    y (b, L, h, p) in x's dtype, final (b, h, p, n) in at least float32 (None unless final_state).
    The work is quadratic in L: meant for short sequences (L of a few tens of tokens).
    """
    out_dtype = x.dtype
    cdt = torch.promote_types(x.dtype, torch.float32)  # as ssd_chunked_torch: no half-precision sums
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    j = h // g  # heads per group: heads g*j .. g*j+j-1 share B_g, C_g
    h0 = initial_state.to(cdt)  # (b, h, p, n)

    log_a = (dt * A).transpose(1, 2)  # (b, h, L)
    decay = torch.exp(segment_sum(log_a))  # (b, h, L, s): decay from token s to token L
    grow = torch.exp(prefix_sum(log_a))  # (b, h, L): decay from the state to token L
    B = B.transpose(1, 2).reshape(b * g, L, n)  # (b g, L, n)
    C = C.transpose(1, 2).reshape(b * g, L, n)

    # Within the chunk: y_l = sum_{s<=l} (C_l . B_s) decay[l, s] x_s dt_s, one matmul per head.
    scores = torch.bmm(C, B.transpose(1, 2)).view(b, g, 1, L, L) * decay.view(b, g, j, L, L)
    xdt = (x * dt[..., None]).transpose(1, 2).reshape(b * h, L, p)  # (b h, L, p)
    y = torch.bmm(scores.view(b * h, L, L), xdt).view(b, h, L, p).transpose(1, 2)  # (b, L, h, p)
    # What the carried-in state adds: grow_l C_l . h0, for all heads of a group in one matmul.
    carried = torch.bmm(C, h0.reshape(b * g, j * p, n).transpose(1, 2)).view(b, g, L, j, p)  # (b, g, L, j, p)
    carried = carried.transpose(1, 2).reshape(b, L, h, p)  # (b, L, h, p)
    y = torch.addcmul(y, carried, grow.transpose(1, 2)[..., None])  # (b, L, h, p)
    if not final_state:
        return y.to(out_dtype), None

    # The state at the chunk's end: h0 decayed over it plus sum_s decay[L-1, s] dt_s x_s B_s^T.
    weighted = x * (dt * decay[..., -1, :].transpose(1, 2))[..., None]  # (b, L, h, p)
    weighted = weighted.view(b, L, g, j * p).transpose(1, 2).reshape(b * g, L, j * p)  # (b g, L, j p)
    added = torch.bmm(B.transpose(1, 2), weighted).view(b, g, n, j, p)  # (b, g, n, j, p)
    added = added.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)  # (b, h, p, n)
    return y.to(out_dtype), torch.addcmul(added, h0, grow[..., -1, None, None])


# ---------------------------------------------------------------------------------------------
# Optional CUDA kernels
# ---------------------------------------------------------------------------------------------


@functools.cache
def load_kernel(name: str) -> Callable | None:
    """The fast scan function of an optional package, or None when it is not importable."""
    module, attr = {
        "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
        "fla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    }[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as exc:  # ImportError, or a broken CUDA / Triton install failing at import
        logger.debug("fast SSD kernel %s unavailable: %r", name, exc)
        return None


def run_mamba_ssm(kernel: Callable, x, dt, A, B, C, chunk_size, initial_state):
    """mamba-ssm's `mamba_chunk_scan_combined` takes exactly our layout and conventions."""
    y, final = kernel(
        x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), chunk_size,
        initial_states=None if initial_state is None else initial_state.contiguous(),
        return_final_states=True,
    )
    return y, final


def run_fla(kernel: Callable, x, dt, A, B, C, chunk_size, initial_state):
    """flash-linear-attention's simple GLA is SSD written as gated linear attention:
    q = C, k = B, v = x dt, per-token log forget gate g = dt A, scale 1. Its state is
    (batch, heads, key=d_state, value=head_dim), the transpose of ours, and it has one key per head.
    It picks its own chunk size, so `chunk_size` is not passed on.
    """
    hpg = x.shape[2] // B.shape[2]
    kwargs = {}
    if "head_first" in inspect.signature(kernel).parameters:
        kwargs["head_first"] = False  # older releases default to (batch, heads, L, dim)
    y, final = kernel(
        q=C.repeat_interleave(hpg, dim=2).contiguous(),  # (b, L, h, n)
        k=B.repeat_interleave(hpg, dim=2).contiguous(),  # (b, L, h, n)
        v=(x * dt[..., None]).contiguous(),  # (b, L, h, p)
        g=(dt * A).contiguous(),  # (b, L, h)
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.transpose(-1, -2).contiguous(),
        output_final_state=True,
        **kwargs,
    )
    return y, final.transpose(-1, -2)  # (b, L, h, p), (b, h, p, n)


_RUNNERS = {"mamba_ssm": run_mamba_ssm, "fla": run_fla}
_DESCRIPTIONS = {
    "torch": "pure-PyTorch chunked SSD (worldsim.model.ssd.ssd_chunked_torch)",
    "mamba_ssm": "mamba-ssm Triton kernel (mamba_chunk_scan_combined)",
    "fla": "flash-linear-attention Triton kernel (chunk_simple_gla)",
}


def resolve_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """Which path `ssd_chunked` takes for `x`: "torch", "mamba_ssm" or "fla"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown SSD backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend != "auto":
        if not x.is_cuda:
            raise ValueError(f"SSD backend {backend!r} runs Triton kernels and needs CUDA tensors, got {x.device}")
        if load_kernel(backend) is None:
            package = {"mamba_ssm": "mamba-ssm", "fla": "flash-linear-attention"}[backend]
            raise RuntimeError(f"SSD backend {backend!r} requested but `{package}` is not importable")
        return backend
    if x.is_cuda and x.dtype in _FAST_DTYPES:
        for name in ("mamba_ssm", "fla"):
            if load_kernel(name) is not None:
                return name
    return "torch"


def default_chunk_size(x: torch.Tensor) -> int:
    """A good SSD chunk length for where `x` lives.

    On CPU, 32: for head_dim 32 and d_state 16 on 2 cores it ran 1.3-3x faster than 64 (the
    within-chunk work grows with the chunk, the state passing shrinks). On CUDA, Mamba2's 256.
    Any value gives the same result up to rounding.
    """
    return 256 if x.is_cuda else 32


def _log_path_once(path: str, x: torch.Tensor) -> None:
    if path not in _logged_paths and not torch.compiler.is_compiling():  # logging breaks a compiled graph
        _logged_paths.add(path)
        note = "" if path != "torch" or not x.is_cuda else " (no mamba-ssm / flash-linear-attention found)"
        logger.info("SSD scan path: %s on %s%s", _DESCRIPTIONS[path], x.device.type, note)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the SSD scan over whole sequences at once.

    Args:
        x: (batch, length, heads, head_dim) inputs.
        dt: (batch, length, heads) positive step sizes (softplus already applied).
        A: (heads,) negative decay rates (one scalar per head).
        B, C: (batch, length, groups, d_state) input / output projections; `groups` divides
            `heads` and heads are split into contiguous runs that share one group (Mamba2's
            n_groups; groups=1 shares B and C across all heads).
        chunk_size: tokens per chunk (64 to 256 is typical; any length is padded internally).
        initial_state: (batch, heads, head_dim, d_state) state before the first token, or None
            for zeros. Resuming from a returned final state gives the same result as scanning the
            concatenated sequence.
        backend: "auto" (CUDA kernel when installed, else PyTorch), "torch", "mamba_ssm" or "fla".

    Returns:
        y: (batch, length, heads, head_dim) in x's dtype, without the D skip term.
        final_state: (batch, heads, head_dim, d_state), float32 or wider on the PyTorch path.
    """
    path = resolve_backend(x, backend)
    _log_path_once(path, x)
    if path == "torch":
        return ssd_chunked_torch(x, dt, A, B, C, chunk_size, initial_state)
    _check_shapes(x, dt, A, B, C, initial_state)
    return _RUNNERS[path](load_kernel(path), x, dt, A, B, C, chunk_size, initial_state)
