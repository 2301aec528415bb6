"""Stream indices for the streaming caches (`WorldModelCache`, `BlockwiseSSMCache`,
`FrameKVCache`): one check of what their `select` and `assign` accept, so they refuse bad
indices alike, before any state changes. (`FrameKVCache.select` is reached only through
`WorldModelCache.select`, which checks first, so it does not check again.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stream_indices(indices: Sequence[int] | torch.Tensor, batch: int, incoming: int | None = None) -> torch.Tensor:
    """Checked 1-D int64 indices into a batch of `batch` streams (on the CPU).

    indices: 1-D ints or a bool mask over the batch. For `select` (incoming None) repeats are
    allowed (forking). For `assign` they must be distinct, one per stream of the incoming cache
    of `incoming` streams. ValueError / IndexError name what is wrong.
    """
    idx = torch.as_tensor(indices).cpu()
    if idx.dtype == torch.bool:
        if idx.shape != (batch,):
            raise ValueError(f"bool mask has shape {tuple(idx.shape)} for {batch} streams")
        idx = idx.nonzero().flatten()
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}; use [i] for one stream")
    idx = idx.long()
    if incoming is not None and idx.numel() != incoming:
        raise ValueError(f"{idx.numel()} stream indices for a cache of {incoming} streams; need one each (one per row)")
    if idx.numel() and (idx.min() < 0 or idx.max() >= batch):
        raise IndexError(f"stream indices {idx.tolist()} out of range for a cache of {batch} streams")
    if incoming is not None and len(set(idx.tolist())) != idx.numel():
        raise ValueError(f"stream indices {idx.tolist()} must be distinct")
    return idx
