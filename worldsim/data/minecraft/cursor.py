"""Draw the mouse cursor into VPT frames recorded with a GUI (inventory, crafting table...) open.

The VPT recorder does not capture the cursor, so without it the frames of an open inventory do not
show where the mouse is, and mouse moves inside a GUI have no visible effect. VPT's own data loader
therefore pastes a 16x16 cursor picture onto every frame whose tick has `isGuiOpen`, its top-left
corner at the recorded mouse position (x, y) times frame height / 720 (the recorder reports the
mouse in the coordinates of a 720-pixel-high window). We draw at the same place and scale, but our
own cursor: the arrow `ARROW` below (10x16 pixels at the recording's resolution, white inside a
black outline, top-left pixel = the hotspot), so no image from elsewhere is bundled.

Frames are already resized when the cursor is drawn (decoding and resizing are one ffmpeg pass,
`video.py`), so the arrow is drawn with the coverage it would have after area averaging: an output
pixel moves towards white (or black) by the fraction of its source-resolution area that the arrow's
white (or black) pixels cover. Over a uniform background this equals drawing at full resolution and
then resizing; it never needs the full-resolution frame.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

GUI_HEIGHT_PX = 720  # the recorder's mouse coordinates are those of a 1280x720 window

# 'O' white, 'X' black, '.' transparent; row 0 is the top. Drawn for worldsim, not copied.
ARROW: tuple[str, ...] = (
    "X.........",
    "XX........",
    "XOX.......",
    "XOOX......",
    "XOOOX.....",
    "XOOOOX....",
    "XOOOOOX...",
    "XOOOOOOX..",
    "XOOOOOOOX.",
    "XOOOOOOOOX",
    "XOOOOOXXXX",
    "XOOXOOX...",
    "XOX.XOOX..",
    "XX..XOOX..",
    "X....XOOX.",
    ".....XXX..",
)
_WHITE = np.array([[c == "O" for c in row] for row in ARROW], np.float64)  # (16, 10)
_BLACK = np.array([[c == "X" for c in row] for row in ARROW], np.float64)  # (16, 10)


def cursor_origin(x: float, y: float, source_height: int) -> tuple[int, int]:
    """Top-left source pixel (column, row) of the cursor for mouse position (x, y), as VPT's loader
    places it (scaled by source_height / 720, truncated to whole pixels)."""
    scale = source_height / GUI_HEIGHT_PX
    return int(x * scale), int(y * scale)


def draw_cursor(
    frames: np.ndarray,
    positions: Iterable[tuple[int, float, float]],
    source_width: int,
    source_height: int,
) -> np.ndarray:
    """A copy of (N, S, S, 3) uint8 frames (resized from source_width x source_height) with the
    arrow drawn at each (frame index, mouse x, mouse y) of `positions`."""
    frames = frames.copy()  # decoded frames are a read-only view of ffmpeg's output
    size = frames.shape[1]
    for t, x, y in positions:
        left, top = cursor_origin(x, y, source_height)
        cover_x = _coverage(left, _WHITE.shape[1], source_width, size)  # (S, 10)
        cover_y = _coverage(top, _WHITE.shape[0], source_height, size)  # (S, 16)
        white = cover_y @ _WHITE @ cover_x.T  # (S, S) fraction of each output pixel
        black = cover_y @ _BLACK @ cover_x.T  # (S, S)
        frame = frames[t].astype(np.float64)  # (S, S, 3)
        frame = frame * (1.0 - white - black)[..., None] + 255.0 * white[..., None]
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


def _coverage(start: int, length: int, source_len: int, size: int) -> np.ndarray:
    """(size, length): the fraction of output cell i (source span [i, i + 1) * source_len / size)
    covered by cursor pixel j (source span [start + j, start + j + 1)). Pixels off the frame
    overlap no cell, so a cursor at the edge is clipped like VPT's."""
    cell = source_len / size
    cells = np.arange(size)[:, None] * cell  # (size, 1) cell starts
    pixels = start + np.arange(length)[None, :]  # (1, length) pixel starts
    overlap = np.minimum(cells + cell, pixels + 1) - np.maximum(cells, pixels)
    return np.clip(overlap, 0.0, None) / cell
