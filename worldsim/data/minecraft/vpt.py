"""Read OpenAI VPT contractor recordings: `<id>.mp4` beside `<id>.jsonl`.

Each jsonl line is one game tick and matches one video frame (20 fps, 640x360). A line holds:

    mouse:     {x, y, dx, dy, buttons: [0 left, 1 right, 2 middle], newButtons, dwheel, ...}
    keyboard:  {keys: ["key.keyboard.w", ...], newKeys, chars}
    hotbar:    selected slot 0-8;  isGuiOpen: bool;  plus tick, yaw, pitch, inventory... (unused)

Line t is what the player did while frame t was on screen, so it leads to frame t + 1: an
episode of N frames has N - 1 actions and the last line's action is dropped (its GUI cursor
still shows in the last frame). Every tick is kept (VPT's behavioural cloning skips idle ticks; a
world model must see time pass).

Mapping into the shared encoding (`actions.py`):
* keys through `KEYBOARD_BINDINGS` (VPT's own keymap); other `key.*` names (chat, F3...) are
  unbound in the game controls we model and are dropped, counted in `ignored_keys`.
* mouse buttons 0/1/2 -> attack/use/pickItem; camera = (dy, dx) * 360/2400 degrees, VPT's
  conversion from mouse counts at the recorders' sensitivity (clipped to +-180 like MineRL).
* Two recorder quirks documented by VPT's loader are corrected as it corrects them:
  - stuck attack: when the first line's newButtons is exactly [0], attack is reported held from the
    start although the player never pressed it; button 0 is removed from every tick until a line
    whose newButtons holds 0 again (a real press, kept from that tick on);
  - scrolling to another hotbar slot is not recorded as a key, so a change of `hotbar` presses
    `hotbar.N` on that tick.
* Inside GUIs (isGuiOpen) the mouse moves a cursor, which the recordings do not show. Like VPT's
  loader we draw one (`cursor.py`: our own arrow at (x, y) * H / 720) into every frame whose tick
  has a GUI open; `draw_cursor=False` leaves the frames as recorded. The mouse deltas are kept as
  recorded (that is what the player did) and VPT's per-version GUI scale factors are not applied.
  Frames with a GUI open are counted in `gui_open_frames`, `cursor_drawn` says whether they show it.

Rewards are 0 (the contractors had no reward) and the episode ends truncated: the recording
stopped, the game did not end the episode.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from worldsim.data.minari_writer import Episode
from worldsim.data.minecraft.actions import button_index, noop_actions, set_camera
from worldsim.data.minecraft.cursor import draw_cursor as draw_gui_cursor
from worldsim.data.minecraft.video import RecordingError, find_paired_recordings, read_video

FORMAT = "vpt"
CAMERA_DEGREES_PER_COUNT = 360.0 / 2400.0
ATTACK_BUTTON = 0

KEYBOARD_BINDINGS: dict[str, str] = {
    "key.keyboard.w": "forward",
    "key.keyboard.s": "back",
    "key.keyboard.a": "left",
    "key.keyboard.d": "right",
    "key.keyboard.space": "jump",
    "key.keyboard.left.shift": "sneak",
    "key.keyboard.left.control": "sprint",
    "key.keyboard.q": "drop",
    "key.keyboard.f": "swapHands",
    "key.keyboard.e": "inventory",
    "key.keyboard.escape": "ESC",
    **{f"key.keyboard.{slot}": f"hotbar.{slot}" for slot in range(1, 10)},
}
MOUSE_BUTTONS: dict[int, str] = {0: "attack", 1: "use", 2: "pickItem"}


def find_episodes(input_dir: Path) -> list[Path]:
    """The `<id>.mp4` of every recording under `input_dir`, including ids that only have a jsonl
    (reading those reports the missing video instead of silently skipping them)."""
    return find_paired_recordings(input_dir, ".mp4", ".jsonl")


def source_files(video_path: Path) -> list[Path]:
    """The files one recording is read from (their content identifies it, `ingest.py`)."""
    return [Path(video_path), Path(video_path).with_suffix(".jsonl")]


def read_episode(video_path: Path, size: int = 64, *, draw_cursor: bool = True) -> Episode:
    """Load one recording as an Episode of N frames and N - 1 actions (rewards are 0).

    draw_cursor: draw the mouse cursor into frames recorded with a GUI open, as VPT's loader does.
    """
    video_path = Path(video_path)
    jsonl_path = video_path.with_suffix(".jsonl")
    if not jsonl_path.is_file():
        raise RecordingError(f"{jsonl_path}: missing (every VPT video needs its action file)")
    ticks = read_ticks(jsonl_path)
    actions, stats = encode_ticks(ticks, jsonl_path)
    cursor = gui_cursor_positions(ticks, jsonl_path)
    frames, info = read_video(
        video_path, size,
        expected_frames=len(ticks), counted_by=f"{jsonl_path} ({len(ticks)} lines)",
    )  # fmt: skip
    if len(frames) < 2:
        raise RecordingError(f"{video_path}: an episode needs 2 frames or more, has {len(frames)}")
    if draw_cursor:
        frames = draw_gui_cursor(frames, cursor, info.width, info.height)

    num_steps = len(frames) - 1
    truncations = np.zeros(num_steps, bool)
    truncations[-1] = True  # the recording stopped; the game did not end the episode
    return Episode(
        observations=frames,
        actions=actions[:num_steps],
        rewards=np.zeros(num_steps),
        terminations=np.zeros(num_steps, bool),
        truncations=truncations,
        metadata={
            "source_format": FORMAT,
            "source_file": str(video_path.resolve()),
            "original_resolution": [info.width, info.height],
            "fps": info.fps,
            **stats,
            "gui_open_frames": len(cursor),
            "cursor_drawn": draw_cursor,
        },
    )


def read_ticks(jsonl_path: Path) -> list[dict[str, Any]]:
    """Parse the jsonl, one object per non-empty line; a bad line is an error naming its number."""
    ticks = []
    try:
        text = Path(jsonl_path).read_text()
    except UnicodeDecodeError as e:
        raise RecordingError(f"{jsonl_path}: not UTF-8 text ({e})") from None
    lines = text.rstrip().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            # Tick t must be line t + 1 so that errors name the right line; only trailing blank
            # lines (a final newline) are accepted.
            raise RecordingError(f"{jsonl_path}:{number}: blank line inside the file")
        try:
            tick = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordingError(f"{jsonl_path}:{number}: corrupt JSON line ({e.msg})") from None
        if not isinstance(tick, dict):
            raise RecordingError(f"{jsonl_path}:{number}: expected a JSON object per line")
        ticks.append(tick)
    if not ticks:
        raise RecordingError(f"{jsonl_path}: no ticks (empty file)")
    return ticks


def encode_ticks(
    ticks: list[dict[str, Any]], jsonl_path: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """(len(ticks), 25) actions in the shared encoding, plus counts for the episode metadata."""
    actions = noop_actions(len(ticks))
    pitch = np.zeros(len(ticks))
    yaw = np.zeros(len(ticks))
    ignored_keys: Counter[str] = Counter()
    attack_stuck = False
    last_hotbar = 0
    for t, tick in enumerate(ticks):
        where = f"{jsonl_path}:{t + 1}"
        mouse = _field(tick, "mouse", dict, where)
        keys = _field(_field(tick, "keyboard", dict, where), "keys", list, where + " keyboard")
        buttons = _field(mouse, "buttons", list, where + " mouse")
        new_buttons = mouse.get("newButtons", [])
        if not isinstance(new_buttons, list):
            raise RecordingError(f"{where}: mouse 'newButtons' must be a list, got {new_buttons!r}")

        # VPT's stuck-attack quirk: a recording whose first tick reports exactly a new press of
        # attack has it "held" from the start until the player really presses it again.
        if t == 0:
            attack_stuck = new_buttons == [ATTACK_BUTTON]
        elif attack_stuck and ATTACK_BUTTON in new_buttons:
            attack_stuck = False
        if attack_stuck:
            buttons = [b for b in buttons if b != ATTACK_BUTTON]

        for key in keys:
            if not isinstance(key, str) or not key.startswith("key."):
                raise RecordingError(f"{where}: keyboard key {key!r} is not a 'key.*' name")
            if key in KEYBOARD_BINDINGS:
                actions[t, button_index(KEYBOARD_BINDINGS[key])] = 1.0
            else:
                ignored_keys[key] += 1
        for button in buttons:
            if button not in MOUSE_BUTTONS:
                raise RecordingError(f"{where}: unknown mouse button {button!r} (expected 0-2)")
            actions[t, button_index(MOUSE_BUTTONS[button])] = 1.0

        hotbar = tick.get("hotbar", last_hotbar)
        if not isinstance(hotbar, int) or not 0 <= hotbar <= 8:
            raise RecordingError(f"{where}: hotbar must be a slot 0-8, got {hotbar!r}")
        if hotbar != last_hotbar:
            actions[t, button_index(f"hotbar.{hotbar + 1}")] = 1.0
        last_hotbar = hotbar

        pitch[t] = _number(mouse, "dy", where) * CAMERA_DEGREES_PER_COUNT
        yaw[t] = _number(mouse, "dx", where) * CAMERA_DEGREES_PER_COUNT
    set_camera(actions, pitch, yaw)
    stats = {"ignored_keys": dict(sorted(ignored_keys.items()))}
    return actions, stats


def gui_cursor_positions(
    ticks: list[dict[str, Any]], jsonl_path: Path
) -> list[tuple[int, float, float]]:
    """(tick index, mouse x, mouse y) of every tick with a GUI open: where the cursor is drawn."""
    positions = []
    for t, tick in enumerate(ticks):
        where = f"{jsonl_path}:{t + 1}"
        gui_open = tick.get("isGuiOpen", False)  # absent in some early recordings: no GUI
        if not isinstance(gui_open, bool):
            raise RecordingError(f"{where}: 'isGuiOpen' must be true or false, got {gui_open!r}")
        if gui_open:
            mouse = _field(tick, "mouse", dict, where)
            positions.append((t, _number(mouse, "x", where), _number(mouse, "y", where)))
    return positions


def _field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in obj:
        raise RecordingError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind):
        raise RecordingError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _number(mouse: dict[str, Any], name: str, where: str) -> float:
    if name not in mouse:
        raise RecordingError(f"{where} mouse: missing field {name!r}")
    value = mouse[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise RecordingError(f"{where}: mouse {name!r} must be a finite number, got {value!r}")
    return float(value)
