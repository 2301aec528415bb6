"""The one action encoding shared by every Minecraft source, so their datasets can be mixed.

An action is a float32 vector of length 25 (`action_space()`), one entry per control a human
has in Minecraft, named as MineRL and VPT name them:

    index  name          meaning during this tick           MineRL key  VPT jsonl
    -----  ------------  ---------------------------------  ----------  -------------------------
      0    forward       held (1) or not (0)                forward     key.keyboard.w
      1    back          held                               back        key.keyboard.s
      2    left          held (strafe)                      left        key.keyboard.a
      3    right         held (strafe)                      right       key.keyboard.d
      4    jump          held                               jump        key.keyboard.space
      5    sneak         held                               sneak       key.keyboard.left.shift
      6    sprint        held                               sprint      key.keyboard.left.control
      7    attack        held (mine / hit)                  attack      mouse button 0
      8    use           held (place / eat / open)          use         mouse button 1
      9    pickItem      held                               pickItem    mouse button 2
     10    drop          held                               drop        key.keyboard.q
     11    swapHands     held                               swapHands   key.keyboard.f
     12    inventory     held (opens / closes inventory)    inventory   key.keyboard.e
     13    ESC           held (pause menu / close a GUI)    ESC         key.keyboard.escape
  14-22    hotbar.1-9    held (select a hotbar slot)        hotbar.N    key.keyboard.1 ... 9
     23    camera_pitch  pitch change, degrees, + = down    camera[0]   mouse dy * 360/2400
     24    camera_yaw    yaw change, degrees, + = right     camera[1]   mouse dx * 360/2400

Entries 0-22 are exactly 0.0 or 1.0. The camera entries are clipped to [-180, 180], the bounds of
MineRL's own camera space. A flat Box was chosen over a dict or a discrete index because the world
model embeds continuous actions with a small MLP (DESIGN.md section 1) and because every dataset
must carry identical spaces to be mixed; a policy can still use a discretised sub-space.

How each source maps into it (each reader documents the details):

* MineRL v0.4 (`rendered.npz`, and the live env in `worldsim.envs.minerl`): the keys above are
  copied, `camera` is already [pitch, yaw] in degrees. MineRL's GUI-free macro actions are not
  keys: `place` (an item name or 'none') becomes `use` = 1, which is how the game places a block;
  `equip`, `craft`, `nearbyCraft` and `nearbySmelt` have no key equivalent and are dropped (their
  non-'none' counts go to the episode metadata as `dropped_actions`). The obfuscated `vector`
  action of the *VectorObf environments cannot be decoded and is rejected.
* VPT contractor data (`<id>.jsonl`): keyboard keys through the table above, mouse buttons
  0/1/2 to attack/use/pickItem, camera from the mouse delta at VPT's 360/2400 degrees per count.
  Unbound keys (chat, F3...) and the scroll wheel are dropped.
* TECO Minecraft (`<id>.npz` `actions`): discrete ids from its collection script:
  1 = forward + jump, 2 = jump + yaw -20 deg, 3 = jump + yaw +20 deg (0 marks the first frame).

Dropped everywhere: the cursor position inside GUIs as an action (VPT frames show the cursor
instead, `cursor.py`), chat, and anything that is not a key, a mouse button or a mouse movement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

ENCODING_NAME = "worldsim-minecraft-keyboard-mouse-v1"

BUTTONS: tuple[str, ...] = (
    "forward", "back", "left", "right", "jump", "sneak", "sprint",
    "attack", "use", "pickItem", "drop", "swapHands", "inventory", "ESC",
    *(f"hotbar.{slot}" for slot in range(1, 10)),
)  # fmt: skip
CAMERA_NAMES: tuple[str, str] = ("camera_pitch", "camera_yaw")
ACTION_NAMES: tuple[str, ...] = BUTTONS + CAMERA_NAMES
ACTION_DIM = len(ACTION_NAMES)
PITCH = ACTION_NAMES.index("camera_pitch")
YAW = ACTION_NAMES.index("camera_yaw")
CAMERA_LIMIT_DEG = 180.0

# MineRL v0.4 actions that pick an item instead of pressing a key (values: item name or 'none').
MINERL_PLACE = "place"
MINERL_DROPPED_MACROS: tuple[str, ...] = ("equip", "craft", "nearbyCraft", "nearbySmelt")
MINERL_NOOP_ITEM = "none"

_BUTTON_INDEX = {name: i for i, name in enumerate(BUTTONS)}


def action_space() -> gym.spaces.Box:
    """The gymnasium space of the encoding (float32, shape (25,))."""
    low = np.zeros(ACTION_DIM, np.float32)
    high = np.ones(ACTION_DIM, np.float32)
    low[[PITCH, YAW]] = -CAMERA_LIMIT_DEG
    high[[PITCH, YAW]] = CAMERA_LIMIT_DEG
    return gym.spaces.Box(low, high, dtype=np.float32)


def noop_actions(num_steps: int = 1) -> np.ndarray:
    """(num_steps, 25) float32 zeros: nothing held, camera still."""
    return np.zeros((num_steps, ACTION_DIM), np.float32)


def button_index(name: str) -> int:
    """Index of a key or mouse button in the vector; a clear error for names the encoding lacks."""
    try:
        return _BUTTON_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown button {name!r}; the encoding has {', '.join(BUTTONS)}") from None


def set_camera(actions: np.ndarray, pitch_deg: np.ndarray, yaw_deg: np.ndarray) -> None:
    """Write camera deltas (degrees) into (N, 25) actions, clipped to the space's bounds."""
    actions[:, PITCH] = np.clip(pitch_deg, -CAMERA_LIMIT_DEG, CAMERA_LIMIT_DEG)
    actions[:, YAW] = np.clip(yaw_deg, -CAMERA_LIMIT_DEG, CAMERA_LIMIT_DEG)


# ---------------------------------------------------------------------------------------- MineRL
def encode_minerl_columns(
    columns: Mapping[str, np.ndarray], num_steps: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Encode MineRL actions given as columns (name -> per-step array, e.g. from rendered.npz).

    Returns the (num_steps, 25) actions and, per dropped macro action, how many steps used it.
    Raises ValueError naming the offending key for unknown names, wrong shapes or bad values.
    """
    actions = noop_actions(num_steps)
    dropped: dict[str, int] = {}
    for name, column in columns.items():
        values = np.asarray(column)
        if values.ndim == 0 or len(values) != num_steps:
            steps = "a scalar" if values.ndim == 0 else f"{len(values)} steps"
            raise ValueError(f"action {name!r} has {steps}, expected {num_steps} steps")
        if name == "camera":
            if values.shape != (num_steps, 2) or not np.issubdtype(values.dtype, np.number):
                raise ValueError(f"action 'camera' must be (N, 2) [pitch, yaw], got {values.shape}")
            if not np.isfinite(values).all():
                raise ValueError("action 'camera' contains NaN or infinite values")
            set_camera(actions, values[:, 0], values[:, 1])
        elif name in _BUTTON_INDEX:
            actions[:, _BUTTON_INDEX[name]] = _binary_column(name, values)
        elif name == MINERL_PLACE:
            actions[:, _BUTTON_INDEX["use"]] = np.maximum(
                actions[:, _BUTTON_INDEX["use"]], _item_chosen(name, values)
            )
        elif name in MINERL_DROPPED_MACROS:
            dropped[name] = int(_item_chosen(name, values).sum())
        elif name == "vector":
            raise ValueError(
                "action 'vector' is MineRL's obfuscated action (a *VectorObf environment); it "
                "cannot be decoded into keys and camera. Use the non-obfuscated environment's data"
            )
        else:
            known = ", ".join((*BUTTONS, "camera", MINERL_PLACE, *MINERL_DROPPED_MACROS))
            raise ValueError(f"unknown action {name!r}; known MineRL actions: {known}")
    return actions, dropped


def encode_minerl_action(action: Mapping[str, Any]) -> np.ndarray:
    """Encode one MineRL action dict (as given to or sampled from a live env) -> (25,) float32."""
    columns = {name: np.asarray(value)[None] for name, value in action.items()}
    return encode_minerl_columns(columns, 1)[0][0]


def to_minerl_action(action: np.ndarray, noop: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a (25,) action into a MineRL action dict, starting from the env's own `noop()`.

    Only keys the env has are set: MineRL environments expose different subsets (Treechop has no
    `use`), so a button the env lacks has no effect there. Macro actions (`place`, `craft`...) stay
    at their no-op value: the encoding cannot say which item to use.
    """
    action = np.asarray(action, np.float32)
    if action.shape != (ACTION_DIM,):
        raise ValueError(
            f"expected an action of shape ({ACTION_DIM},) in the "
            f"{ENCODING_NAME} encoding, got {action.shape}"
        )
    out = dict(noop)
    for name, index in _BUTTON_INDEX.items():
        if name in out:
            out[name] = int(action[index] > 0.5)
    if "camera" in out:
        out["camera"] = np.clip(action[[PITCH, YAW]], -CAMERA_LIMIT_DEG, CAMERA_LIMIT_DEG)
    return out


def _binary_column(name: str, values: np.ndarray) -> np.ndarray:
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise ValueError(
            f"action {name!r} must be a 1-D 0/1 array, got {values.shape} {values.dtype}"
        )
    if not np.isin(values, (0, 1)).all():
        bad = values[~np.isin(values, (0, 1))][0]
        raise ValueError(f"action {name!r} must be 0 or 1, found {bad!r}")
    return values.astype(np.float32)


def _item_chosen(name: str, values: np.ndarray) -> np.ndarray:
    """1.0 where a macro action names an item. v0.4 stores item names; older data stored enum
    indices where 0 is 'none', so both are accepted."""
    if values.ndim != 1:
        raise ValueError(f"action {name!r} must be 1-D, got shape {values.shape}")
    if values.dtype.kind in "US":
        return (values.astype(str) != MINERL_NOOP_ITEM).astype(np.float32)
    if np.issubdtype(values.dtype, np.integer):
        return (values != 0).astype(np.float32)
    raise ValueError(f"action {name!r} must hold item names, got {values.dtype}")
