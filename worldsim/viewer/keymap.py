"""Keyboard -> action maps for the viewer, and the viewer's own control keys.

A keymap turns the set of keys held down (plus keys tapped since the last dream step, so that a
tap shorter than one frame still counts) into ONE discrete action. No key means the game's first
action, which is "noop" in Memory Maze. Keys are pygame key codes.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass

import pygame

from worldsim.envs.memory_maze import ACTION_NAMES

FORWARD_KEYS = frozenset({pygame.K_UP, pygame.K_w})
LEFT_KEYS = frozenset({pygame.K_LEFT, pygame.K_a})
RIGHT_KEYS = frozenset({pygame.K_RIGHT, pygame.K_d})
# K_0..K_9 and the keypad's digits; digit d selects action d.
DIGIT_KEYS = {**{getattr(pygame, f"K_{d}"): d for d in range(10)},
              **{getattr(pygame, f"K_KP{d}"): d for d in range(10)}}

# The viewer's commands. None of these keys is a game key (a test keeps it so).
CONTROLS: dict[int, str] = {
    pygame.K_SPACE: "pause",
    pygame.K_PERIOD: "step",
    pygame.K_n: "step",
    pygame.K_TAB: "agent",
    pygame.K_r: "reset",
    pygame.K_v: "real",
    pygame.K_c: "record",
    pygame.K_ESCAPE: "quit",
    pygame.K_q: "quit",
}
CONTROLS_HELP = "space pause  ./N step  Tab human/agent  R reset  V real  C record  Esc/Q quit"


@dataclass(frozen=True)
class Keymap:
    """Held keys -> one action in [0, len(action_names))."""

    name: str
    action_names: tuple[str, ...]
    action_of: Callable[[frozenset[int]], int]
    help: str
    """One line for the overlay: which keys do what."""

    def __call__(self, keys: Set[int]) -> int:
        return self.action_of(frozenset(keys))


def _maze_action(keys: frozenset[int]) -> int:
    forward = bool(keys & FORWARD_KEYS)
    turn = bool(keys & LEFT_KEYS) - bool(keys & RIGHT_KEYS)  # left and right together cancel out
    if forward:
        name = {1: "forward_left", -1: "forward_right", 0: "forward"}[turn]
    else:
        name = {1: "turn_left", -1: "turn_right", 0: "noop"}[turn]  # no backward move in Memory Maze
    return ACTION_NAMES.index(name)


MEMORY_MAZE_KEYMAP = Keymap(
    "memory_maze", ACTION_NAMES, _maze_action, "up/W forward  left/A, right/D turn (combine with forward)"
)


def number_keymap(n_actions: int) -> Keymap:
    """Any Discrete(n): digit key d -> action d (the lowest digit if several are held), else 0.
    Only actions 0..9 have a key; larger ones are reachable in agent mode only."""
    if n_actions < 1:
        raise ValueError(f"n_actions must be >= 1, got {n_actions}")

    def action_of(keys: frozenset[int]) -> int:
        digits = [DIGIT_KEYS[k] for k in keys if k in DIGIT_KEYS and DIGIT_KEYS[k] < n_actions]
        return min(digits, default=0)

    top = min(n_actions, 10) - 1
    return Keymap(f"discrete_{n_actions}", tuple(str(i) for i in range(n_actions)), action_of,
                  f"number keys 0-{top}: action (none held: 0)")


def keymap_for(n_actions: int) -> Keymap:
    """Memory Maze's keys for its 6 actions (the only 6-action game here), number keys otherwise."""
    return MEMORY_MAZE_KEYMAP if n_actions == len(ACTION_NAMES) else number_keymap(n_actions)
