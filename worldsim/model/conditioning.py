"""Per-frame conditioning: noise-level and action embeddings, and adaLN-Zero modulation.

Every frame t gets one conditioning vector c_t = noise_embedding(c_noise_t) + action_embedding(a_t)
(B, T, d_model), broadcast over the frame's tokens. Each residual branch of the backbone reads
(shift, scale, gate) from its own `AdaLNZero(c_t)` and computes x + gate * f(norm(x) * (1 + scale)
+ shift), as in DiT (Peebles & Xie 2023, arXiv 2212.09748, "adaLN-Zero"): the modulation is
zero-initialised, so at init every branch is the identity and the network starts as the skip path.

Action alignment: frame t is conditioned on the action that LED TO it (a_{t-1} of the data). The
first frame of a stream has no such action and gets a learned "no action" embedding: the extra
table row `n_actions` for discrete actions, a learned vector for continuous ones (chosen per frame
by the `no_action` mask). `shift_actions` turns data-aligned actions into this form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from worldsim.model.config import ModelConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., N, d) with per-frame shift, scale (..., d): broadcast over the N tokens."""
    return x * (1 + scale.unsqueeze(-2)) + shift.unsqueeze(-2)


class AdaLNZero(nn.Module):
    """c (..., d_cond) -> `n_chunks` tensors (..., d_model), from a zero-initialised SiLU + Linear."""

    def __init__(self, d_cond: int, d_model: int, n_chunks: int):
        super().__init__()
        self.n_chunks = n_chunks
        self.linear = nn.Linear(d_cond, n_chunks * d_model)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.n_chunks, dim=-1)


class NoiseLevelEmbedding(nn.Module):
    """EDM's c_noise = ln(sigma) / 4 (B, T) -> (B, T, d_model): sinusoidal features, then an MLP.

    c_noise spans about [-1.7, 1] for the training sigmas and ln(1e-3) / 4 = -1.7 for clean
    context frames; frequencies from 1 to 1000 resolve that range finely and smoothly.
    """

    def __init__(self, d_model: int, n_freqs: int = 64, max_freq: float = 1000.0):
        super().__init__()
        # Not a parameter and not saved: a fixed function of (n_freqs, max_freq).
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), n_freqs), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.unsqueeze(-1) * self.freqs.to(c_noise.dtype)  # (B, T, n_freqs)
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, T, 2 n_freqs)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ActionEmbedding(nn.Module):
    """Actions (B, T) int | (B, T, D) float, plus an optional no_action (B, T) bool -> (B, T, d_model).

    Discrete: a table of n_actions + 1 rows; the last row (index n_actions) is "no action".
    Continuous: Linear-SiLU-Linear on the vector; where no_action is True a learned vector instead.
    `check` gives a clear error for a wrong shape, dtype or range.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.action_kind
        self.n_actions, self.action_dim = cfg.n_actions, cfg.action_dim
        if self.kind == "discrete":
            self.table = nn.Embedding(cfg.n_actions + 1, cfg.d_model)
            nn.init.normal_(self.table.weight, std=0.02)
        else:
            self.mlp = nn.Sequential(nn.Linear(cfg.action_dim, cfg.d_model), nn.SiLU(),
                                     nn.Linear(cfg.d_model, cfg.d_model))
            self.no_action = nn.Parameter(torch.randn(cfg.d_model) * 0.02)

    def check(self, actions: torch.Tensor, lead: tuple[int, ...], no_action: torch.Tensor | None) -> None:
        """ValueError unless actions fit this model for leading dims `lead` ((B, T) or (B,))."""
        if not isinstance(actions, torch.Tensor):
            raise TypeError(f"actions must be a torch.Tensor, got {type(actions).__name__}")
        if self.kind == "discrete":
            if actions.shape != lead:
                raise ValueError(f"discrete actions must have shape {lead}, got {tuple(actions.shape)}")
            if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
                raise ValueError(f"discrete actions must be integers (int64), got {actions.dtype}")
            # Value checks read the tensor (a sync, and a graph break under torch.compile): the
            # compiled training step feeds actions it gathered itself, checked when loaded.
            if not torch.compiler.is_compiling() and actions.numel() and (
                    int(actions.min()) < 0 or int(actions.max()) > self.n_actions):
                raise ValueError(
                    f"discrete actions must lie in [0, {self.n_actions - 1}] (or {self.n_actions} = no action), "
                    f"got values in [{int(actions.min())}, {int(actions.max())}]"
                )
        else:
            want = (*lead, self.action_dim)
            if actions.shape != want:
                raise ValueError(f"continuous actions must have shape {want}, got {tuple(actions.shape)}")
            if not actions.dtype.is_floating_point:
                raise ValueError(f"continuous actions must be floating point, got {actions.dtype}")
            if not torch.compiler.is_compiling() and not torch.isfinite(actions).all():
                raise ValueError("continuous actions contain NaN or inf; mark missing actions with no_action")
        if no_action is not None and (no_action.shape != lead or no_action.dtype != torch.bool):
            raise ValueError(f"no_action must be a bool tensor of shape {lead}, got {no_action.dtype} {tuple(no_action.shape)}")

    def forward(self, actions: torch.Tensor, no_action: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "discrete":
            if no_action is not None:
                actions = torch.where(no_action, torch.full_like(actions, self.n_actions), actions)
            return self.table(actions.long())  # (B, T, d)
        emb = self.mlp(actions.to(self.no_action.dtype))  # (B, T, d)
        if no_action is not None:
            emb = torch.where(no_action.unsqueeze(-1), self.no_action, emb)
        return emb


def shift_actions(actions: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aligned actions (a_t taken AT frame t) -> model-aligned (frame t gets a_{t-1}).

    actions (B, T) | (B, T, D) -> (cond_actions of the same shape, no_action (B, T) bool). Frame 0
    has no previous action: it is marked no_action (and, for discrete actions, gets the index
    n_actions). The last action of the window conditions nothing.
    """
    B, T = actions.shape[:2]
    if cfg.action_kind == "discrete":
        first = torch.full_like(actions[:, :1], cfg.n_actions)  # (B, 1)
    else:
        first = torch.zeros_like(actions[:, :1])  # (B, 1, D): ignored under no_action
    cond = torch.cat([first, actions[:, :-1]], dim=1)  # (B, T, ...)
    no_action = torch.zeros(B, T, dtype=torch.bool, device=actions.device)
    no_action[:, 0] = True
    return cond, no_action
