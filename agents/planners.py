"""Planners in imagination: random shooting, CEM and MPPI over discrete action sequences.

Every planner works on a live batch-1 `RolloutSession` (the model having seen the real past):

    plan = planner.plan(session, rng)   # -> Plan: the chosen action sequence, its first action

One planning iteration forks the live session into N candidate streams (`RolloutSession.fork`,
which copies the cache and each stream's noise generator, so the live session is never touched),
dreams H steps with N sampled action sequences in one batched model call per step, and scores
each sequence. Scores need no pixels (the goal image is compared in latent space), so the dreamed
latents are never decoded (`RolloutSession.step(..., decode=False)`):

    score = sum_t discount^t r_t                      predicted rewards, zero after a predicted termination
            - goal_weight * mean((z_H - z_goal)^2)    optional: latent distance of the last dreamed
                                                      frame to a goal image encoded by the codec

All candidates start from copies of the same generator state, so within one iteration they see the
same sampler noise (common random numbers): score differences come from the actions.

- `RandomShooting`: N uniform sequences, one iteration, the best one wins.
- `CEM` (cross-entropy method, Rubinstein 1999): per-step categorical distributions over the
  actions, refit each iteration to the action frequencies of the top `elites` sequences.
- `MPPI` (model-predictive path integral, Williams et al. 2017), discrete form: the distributions
  are refit to the softmax(score / temperature)-weighted action frequencies of all N sequences;
  the plan is the most likely action of each step.

Memory: N forked streams hold N copies of the streaming state; a denoiser call reads it without
copying it (`WorldModel.step(commit=False)`), and its temporaries (one layer's new SSM state and
keys at a time) are a fraction of it, so a plan needs about N x (state bytes per stream), counted
twice for a safety margin. Above `max_memory_mb` the planner refuses before forking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from worldsim.rollout.session import MODEL_DTYPES, RolloutSession, model_in_bf16


@dataclass
class PlannerConfig:
    horizon: int = 8
    """Dreamed steps per candidate action sequence (H)."""
    candidates: int = 64
    """Action sequences dreamed in parallel per iteration (N)."""
    iterations: int = 3
    """Sample-score-refit rounds (random shooting always does one)."""
    discount: float = 0.99
    """Per-step discount of the predicted rewards."""
    sampler_steps: int = 1
    """Denoiser calls per dreamed frame while planning (fewer than the viewer's: speed over looks)."""
    elites: int = 8
    """CEM: sequences the distributions are refit to."""
    temperature: float = 1.0
    """MPPI: softmax temperature on the scores (lower = greedier)."""
    smoothing: float = 0.1
    """CEM / MPPI: weight kept on the previous distribution at each refit (keeps every action possible)."""
    goal_weight: float = 1.0
    """Weight of the goal-image term, used only when a goal is set."""
    max_memory_mb: float = 2048.0
    """Refuse to plan when the N forked states would need more than this."""
    model_dtype: str = "auto"
    """The world model the candidates are dreamed with: "auto" (bfloat16 on a CPU with AMX from 16
    candidates, as `bf16_model_pays`), "float32" or "bfloat16" (the live stream is not changed)."""

    def validate(self, n_actions: int | None = None) -> None:
        for name in ("horizon", "candidates", "iterations", "sampler_steps", "elites"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"planner {name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if not np.isfinite(self.goal_weight):
            raise ValueError(f"goal_weight must be finite, got {self.goal_weight}")
        if not self.max_memory_mb > 0.0:
            raise ValueError(f"max_memory_mb must be > 0, got {self.max_memory_mb}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}")
        if n_actions is not None and n_actions < 2:
            raise ValueError(f"planning needs at least 2 actions to choose from, got {n_actions}")


@dataclass
class Plan:
    actions: np.ndarray
    """(H,) int64, the chosen action sequence."""
    score: float
    """Its score in the last iteration it was dreamed in."""
    probs: np.ndarray | None = None
    """(H, A) the final per-step action distributions (CEM / MPPI), None for random shooting."""
    scores: list[float] = field(default_factory=list)
    """Best score of each iteration."""

    @property
    def first_action(self) -> int:
        return int(self.actions[0])


def plan_memory_bytes(session: RolloutSession, candidates: int) -> int:
    """Bytes the forked candidate states need: N streams, doubled as a margin for the temporaries."""
    per_stream = session.state_nbytes() / session.batch
    latent = session.latents[0].numel() * session.latents.element_size()
    return int(2 * candidates * (per_stream + latent))


class Planner:
    """Shared machinery: validation, the memory check, batched dreaming and scoring."""

    name = "planner"

    def __init__(self, config: PlannerConfig | None = None, goal_latent: torch.Tensor | None = None) -> None:
        self.config = config or PlannerConfig()
        self.config.validate()
        self.goal_latent = goal_latent

    def set_goal(self, codec, goal_frame: np.ndarray | None) -> None:
        """Score plans also by how close their last frame comes to `goal_frame` (H, W, 3) uint8
        (in the codec's latent space); None removes the goal."""
        if goal_frame is None:
            self.goal_latent = None
            return
        goal = np.asarray(goal_frame)
        if goal.dtype != np.uint8 or goal.ndim != 3 or goal.shape[-1] != 3:
            raise ValueError(f"goal image must be (H, W, 3) uint8, got {goal.shape} {goal.dtype}")
        with torch.no_grad():
            self.goal_latent = codec.encode(torch.as_tensor(goal)[None])[0]  # (C, h, w)

    # -- checks ----------------------------------------------------------------------------------

    def check(self, session: RolloutSession) -> None:
        if not session.discrete:
            raise ValueError("the planners search discrete actions; this model takes continuous ones")
        if session.batch != 1:
            raise ValueError(f"plan from a batch-1 session (the live stream), got batch {session.batch}")
        self.config.validate(session.model.cfg.n_actions)
        need = plan_memory_bytes(session, self.config.candidates)
        budget = self.config.max_memory_mb * 2**20
        if need > budget:
            per = need / self.config.candidates
            fits = int(budget // per)
            raise MemoryError(
                f"{self.config.candidates} candidates need about {need / 2**20:.1f} MB of forked model state "
                f"({per / 2**20:.2f} MB each), over the {self.config.max_memory_mb:g} MB budget: use at most "
                f"{fits} candidates or raise max_memory_mb"
            )
        if self.goal_latent is not None and tuple(self.goal_latent.shape) != tuple(session.latents.shape[1:]):
            raise ValueError(f"goal latent {tuple(self.goal_latent.shape)} does not match the model's "
                             f"{tuple(session.latents.shape[1:])}")

    # -- dreaming --------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, session: RolloutSession, sequences: np.ndarray) -> np.ndarray:
        """Dream every sequence (N, H) from copies of the live stream -> scores (N,) float64."""
        cfg = self.config
        n, horizon = sequences.shape
        if model_in_bf16(cfg.model_dtype, session.device, n):
            session = session.in_bfloat16()  # a copy: the live stream stays in float32
        dream = session.fork(n)  # copies: the live session's cache and generators stay as they are
        dream.sampler_steps = cfg.sampler_steps
        total = torch.zeros(n, dtype=torch.float64)
        alive = torch.ones(n, dtype=torch.bool)
        for t in range(horizon):
            out = dream.step(sequences[:, t], decode=False)  # scores need no pixels
            total += (cfg.discount ** t) * out.rewards.double() * alive
            alive &= ~out.terminated  # nothing is earned after a predicted episode end
        if self.goal_latent is not None:
            goal = self.goal_latent.to(out.latents.device)
            dist = (out.latents - goal).pow(2).flatten(1).mean(1).double().cpu()  # (N,)
            total -= cfg.goal_weight * dist
        return total.numpy()

    def plan(self, session: RolloutSession, rng: np.random.Generator) -> Plan:
        raise NotImplementedError


def sample_sequences(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(H, A) per-step distributions -> (n, H) int64 sequences, each step drawn independently."""
    cum = np.cumsum(probs, axis=1)  # (H, A)
    cum[:, -1] = 1.0  # guard against rounding: every draw lands on some action
    u = rng.random((n, probs.shape[0], 1))  # (n, H, 1)
    return (u > cum[None]).sum(axis=2).astype(np.int64)  # (n, H)


def action_frequencies(sequences: np.ndarray, weights: np.ndarray, n_actions: int) -> np.ndarray:
    """Weighted per-step action histogram: sequences (N, H), weights (N,) summing to 1 -> (H, A)."""
    onehot = np.eye(n_actions)[sequences]  # (N, H, A)
    return np.einsum("n,nha->ha", weights, onehot)


class RandomShooting(Planner):
    """N uniform sequences, one round; the best-scoring one is the plan."""

    name = "random-shooting"

    def plan(self, session: RolloutSession, rng: np.random.Generator) -> Plan:
        self.check(session)
        cfg, n_actions = self.config, session.model.cfg.n_actions
        seqs = rng.integers(0, n_actions, size=(cfg.candidates, cfg.horizon))
        scores = self.score(session, seqs)
        best = int(np.argmax(scores))
        return Plan(seqs[best].astype(np.int64), float(scores[best]), None, [float(scores[best])])


class _DistributionPlanner(Planner):
    """CEM and MPPI: sample from per-step categoricals, score, refit; they differ in the refit."""

    def refit_target(self, seqs: np.ndarray, scores: np.ndarray, n_actions: int) -> np.ndarray:
        raise NotImplementedError

    def final_plan(self, best_seq: np.ndarray, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def plan(self, session: RolloutSession, rng: np.random.Generator) -> Plan:
        self.check(session)
        cfg, n_actions = self.config, session.model.cfg.n_actions
        probs = np.full((cfg.horizon, n_actions), 1.0 / n_actions)
        best_seq, best_score, history = None, -np.inf, []
        for _ in range(cfg.iterations):
            seqs = sample_sequences(probs, cfg.candidates, rng)
            scores = self.score(session, seqs)
            i = int(np.argmax(scores))
            history.append(float(scores[i]))
            if scores[i] > best_score:
                best_seq, best_score = seqs[i], float(scores[i])
            probs = cfg.smoothing * probs + (1.0 - cfg.smoothing) * self.refit_target(seqs, scores, n_actions)
        return Plan(self.final_plan(best_seq, probs), best_score, probs, history)


class CEM(_DistributionPlanner):
    """Refit to the top-`elites` sequences; the plan is the best sequence dreamed."""

    name = "cem"

    def __init__(self, config: PlannerConfig | None = None, goal_latent: torch.Tensor | None = None) -> None:
        super().__init__(config, goal_latent)
        if self.config.elites > self.config.candidates:
            raise ValueError(f"CEM elites ({self.config.elites}) cannot exceed candidates ({self.config.candidates})")

    def refit_target(self, seqs, scores, n_actions):
        elite = np.argsort(-scores, kind="stable")[: self.config.elites]
        weights = np.full(len(elite), 1.0 / len(elite))
        return action_frequencies(seqs[elite], weights, n_actions)

    def final_plan(self, best_seq, probs):
        return best_seq.astype(np.int64)


class MPPI(_DistributionPlanner):
    """Refit to all sequences weighted by softmax(score / temperature); the plan is each step's mode."""

    name = "mppi"

    def refit_target(self, seqs, scores, n_actions):
        z = (scores - scores.max()) / self.config.temperature  # max-shifted: exp never overflows
        weights = np.exp(z)
        return action_frequencies(seqs, weights / weights.sum(), n_actions)

    def final_plan(self, best_seq, probs):
        return probs.argmax(axis=1).astype(np.int64)


PLANNERS: dict[str, type[Planner]] = {p.name: p for p in (RandomShooting, CEM, MPPI)}
"""The planners by their CLI name."""


def make_planner(name: str, config: PlannerConfig | None = None) -> Planner:
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}: choose one of {', '.join(PLANNERS)}")
    return PLANNERS[name](config)
