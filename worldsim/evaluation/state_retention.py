"""How long each SSM head of a world model keeps what it saw: its retention per frame on real data.

A Mamba2 head's state decays by exp(A * dt) per token it scans (A = -exp(A_log) < 0, dt =
softplus(dt_raw + dt_bias) > 0, dt chosen by the head from its input: the "selective" part). In
the block-wise scan a block's state reads b_h * b_w tokens per frame, so what it held one frame
ago is kept by

    retention per frame = exp(A * sum of dt over the block's tokens of that frame)

and after k frames by the product of k such factors. Whatever the head wrote before the attention
window can only reach a later frame through these factors, so a head whose retention is ~0 within a
frame or two cannot carry memory, however it was trained. The summary per head is the median over
blocks, streams and frames of the log retention, as "frames to 1/e" (-1 / median log retention):
the time over which the head keeps 37% of a typical frame's state.

    with SSMRetention(model) as retention:
        model(latents, sigma, actions, ...)   # any parallel forward over real frames (a prefill)
    layers = retention.summary()              # per layer: block, heads' frames to 1/e

Only the parallel `forward` path is recorded (the step path scans one frame at a time and is the
same function). Models without SSM layers (causal_window, causal_full) give an empty summary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from worldsim.model.blockwise_ssm import BlockwiseMamba2, tokens_to_blocks


def frame_log_retention(layer: BlockwiseMamba2, x: torch.Tensor) -> torch.Tensor:
    """log retention per frame of each block and head, for the layer's input x (B, T, H*W, d)
    -> (B * n_blocks, T, heads) float32, all <= 0."""
    if x.dim() != 4:
        raise ValueError(f"expected the layer's input (batch, frames, tokens, d_model), got {tuple(x.shape)}")
    u = tokens_to_blocks(x, layer.grid, layer.block)  # (rows, T * L, d)
    dt_raw = F.linear(u, layer.in_proj.weight[-layer.n_heads:])  # the in_proj rows that give dt (no bias)
    dt = layer.step_sizes(dt_raw.float())  # (rows, T * L, h)
    per_block = layer.block[0] * layer.block[1]
    dt_per_frame = dt.unflatten(1, (x.shape[1], per_block)).sum(2)  # (rows, T, h)
    return dt_per_frame * layer.decay_rates()


class SSMRetention:
    """Records every SSM layer's per-frame log retention during the forwards run inside `with`."""

    def __init__(self, model) -> None:
        net = model.net if hasattr(model, "net") else model
        self.layers = [(i, block.ssm) for i, block in enumerate(net.blocks) if block.ssm is not None]
        self.records: dict[int, list[torch.Tensor]] = {i: [] for i, _ in self.layers}
        self._handles: list = []

    def __enter__(self) -> SSMRetention:
        for i, layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def record(layer: BlockwiseMamba2, args) -> None:
            with torch.no_grad():
                self.records[index].append(frame_log_retention(layer, args[0]).flatten(0, 1).cpu())  # (rows T, h)
        return record

    def summary(self) -> list[dict[str, Any]]:
        """Per SSM layer: its index, block, and per head the median log retention per frame and
        the frames to 1/e (None for a head that keeps everything: median log retention 0)."""
        out = []
        for i, layer in self.layers:
            if not self.records[i]:
                raise RuntimeError("no forward of the model ran inside `with SSMRetention(model)`")
            median = torch.cat(self.records[i]).median(dim=0).values  # (h,)
            out.append({
                "layer": i, "block": list(layer.block),
                "median_log_retention": [float(m) for m in median],
                "frames_to_1e": [None if m >= 0 else -1.0 / float(m) for m in median],
            })
        return out


def long_memory_heads(summary: list[dict[str, Any]], frames: int) -> list[tuple[int, int, float]]:
    """(layer, head, frames to 1/e) of the heads that keep 1/e of a frame's state for more than
    `frames` frames (e.g. the attention window), longest first."""
    found = [(layer["layer"], h, math.inf if f is None else f)
             for layer in summary for h, f in enumerate(layer["frames_to_1e"]) if f is None or f > frames]
    return sorted(found, key=lambda x: -x[2])


def describe(summary: list[dict[str, Any]], window: int | None) -> str:
    """One line: how many heads outlast the window, and which."""
    if not summary:
        return "no SSM layers"
    total = sum(len(layer["frames_to_1e"]) for layer in summary)
    if window is None:
        return f"{total} SSM heads (no finite attention window to compare with)"
    heads = long_memory_heads(summary, window)
    listed = ", ".join(f"layer {l} head {h} ({'all' if math.isinf(f) else f'{f:.0f}'})" for l, h, f in heads)
    typical = sorted(f for layer in summary for f in layer["frames_to_1e"] if f is not None)
    median = typical[len(typical) // 2] if typical else math.inf
    return (f"{len(heads)} of {total} SSM heads keep 1/e of a frame's state for longer than the "
            f"{window}-frame window" + (f": {listed}" if heads else "")
            + f"; the median head {median:.1f} frames")
