"""Small text labels ("real", "dream") drawn on the panels of written video frames."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 13
"""Rows at the top of each panel a label may cover (the rest of the panel is left as it was)."""


def label_panels(frame: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """(H, W, 3) uint8 made of len(labels) equal panels side by side -> a copy with each label in
    white on a dark box at its panel's top-left corner (PIL's built-in bitmap font). The frame
    keeps its size; only the top LABEL_HEIGHT rows of each panel's left corner change."""
    if not labels:
        return frame
    image = Image.fromarray(np.ascontiguousarray(frame))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    panel = frame.shape[1] // len(labels)
    for i, label in enumerate(labels):
        x0 = i * panel
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        width = min(right - left + 4, panel)
        draw.rectangle((x0, 0, x0 + width - 1, LABEL_HEIGHT - 1), fill=(0, 0, 0))
        draw.text((x0 + 2 - left, (LABEL_HEIGHT - (bottom - top)) // 2 - top), label, fill=(255, 255, 255), font=font)
    return np.asarray(image)
