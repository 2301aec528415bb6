"""Find the steps of a trajectory where the agent is back at a pose it last had long ago.

These steps are what the memory evaluation scores: a frame whose view was last seen more than the
model's local-attention window ago can only be predicted from long-term (SSM) memory.

Two steps *match* when the agent positions are within `pos_tol` and the headings within
`dir_tol_deg`. For a step `t`, the agent's *current visit* is the run of consecutive steps just
before `t` that all match `t` (the approach: moving or turning continuously keeps neighbouring
steps alike). The pose was *last seen* at the latest matching step before that run. Step `t` is a
revisit when it was last seen at least `min_gap` steps before its current visit began (so every
step of one visit gets the same verdict). Measuring from the last sighting, not the first,
matters: a place seen at steps 0 and 150 is not "300 steps old" at step 300.

A revisit lasts several steps (every step of an arrival qualifies, and retracing an old path
makes a long run of them), so consecutive revisit steps are collapsed to the first of their run.
A run also ends where its matched earlier step jumps by more than MAX_MATCH_JUMP steps: the agent
has reached a spot where it lingered before (e.g. turned on the spot), which is a place of its
own and gets its own entry. The output has at most one entry per (arrival, old place).
"""

from __future__ import annotations

import numpy as np

# Retracing a path at about its original speed advances the matched earlier step by ~1 per step;
# a larger jump means the old visit lingered there.
MAX_MATCH_JUMP = 5


def find_revisits(
    agent_pos: np.ndarray,
    agent_dir: np.ndarray,
    *,
    min_gap: int,
    pos_tol: float = 0.5,
    dir_tol_deg: float = 30.0,
) -> list[tuple[int, int]]:
    """Revisits in one trajectory, as `(t_now, t_before)` index pairs, sorted by `t_now`.

    agent_pos: (T, 2) positions (any unit; `pos_tol` is in the same unit).
    agent_dir: (T, 2) heading vectors (normalised here; zero vectors are an error).
    min_gap:   smallest `t_now - t_before` reported, in steps.
    Returns the first step of each arrival at a pose last seen at least `min_gap` steps before
    the arrival, with `t_before` the step it was last seen at.
    """
    pos, unit_dir = _check_trajectory(agent_pos, agent_dir)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, np.integer)) or min_gap < 1:
        raise ValueError(f"min_gap must be a positive integer number of steps, got {min_gap!r}")
    if not np.isfinite(pos_tol) or pos_tol <= 0:
        raise ValueError(f"pos_tol must be a positive distance, got {pos_tol!r}")
    if not 0 <= dir_tol_deg <= 180:
        raise ValueError(f"dir_tol_deg must be an angle in [0, 180] degrees, got {dir_tol_deg!r}")

    cos_tol = np.cos(np.radians(dir_tol_deg))
    revisits: list[tuple[int, int]] = []
    previous_match: int | None = None  # matched step of t - 1 when t - 1 was a revisit step
    for t in range(min_gap, len(pos)):
        visit_start, last_seen = _current_visit(pos, unit_dir, t, pos_tol, cos_tol)
        if last_seen is None or visit_start - last_seen < min_gap:
            previous_match = None
            continue
        if previous_match is None or abs(last_seen - previous_match) > MAX_MATCH_JUMP:
            revisits.append((t, last_seen))
        previous_match = last_seen
    return revisits


def _current_visit(
    pos: np.ndarray, unit_dir: np.ndarray, t: int, pos_tol: float, cos_tol: float
) -> tuple[int, int | None]:
    """(first step of the visit `t` belongs to, latest earlier step matching `t` or None)."""
    close = np.linalg.norm(pos[:t] - pos[t], axis=1) <= pos_tol  # (t,)
    aligned = unit_dir[:t] @ unit_dir[t] >= cos_tol  # (t,)
    matches = close & aligned
    misses = np.flatnonzero(~matches)
    if len(misses) == 0:
        return 0, None  # the agent has been at this pose since the start: never left
    visit_start = int(misses[-1]) + 1  # the current visit is steps [visit_start, t]
    earlier = np.flatnonzero(matches[:visit_start])
    return visit_start, (int(earlier[-1]) if len(earlier) else None)


def _check_trajectory(
    agent_pos: np.ndarray, agent_dir: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(agent_pos, dtype=np.float64)
    direction = np.asarray(agent_dir, dtype=np.float64)
    for name, array in (("agent_pos", pos), ("agent_dir", direction)):
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"{name} must have shape (T, 2), got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")
    if len(pos) != len(direction):
        raise ValueError(
            "agent_pos and agent_dir must have the same length, "
            f"got {len(pos)} and {len(direction)}"
        )
    norms = np.linalg.norm(direction, axis=1)
    if np.any(norms == 0):
        steps = np.flatnonzero(norms == 0)[:5].tolist()
        raise ValueError(f"agent_dir has zero vectors (no heading) at steps {steps}...")
    return pos, direction / norms[:, None]
