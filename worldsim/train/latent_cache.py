"""Latents of every dataset episode, encoded once by the frozen codec, to train from windows of them.

The codec is frozen, so encoding the same frames at every step (B * T frames per step, about 0.24 s
of a step with the "small" codec on one CPU thread) repeats work whose result never changes. The
cache encodes each episode once and training slices latent windows out of it.

Layout (one folder per codec and dataset, one file per episode):

    <run_dir>/latents/<codec sha256[:16]>/<dataset name>-<sha256(data path)[:8]>/episode_000012.safetensors

Each file holds "latents" (steps, C, h, w) float32: the latents of frames o_0 .. o_{N-1} (the final
observation o_N is never part of a window, see `worldsim.data.windows`). float32, not float16:
encoding an episode in chunks gives bit-for-bit the latents of encoding each window (measured on
CPU), so a cached run trains exactly like an on-the-fly one; float16 would add an error of
~2e-4 rms (2e-3 max) on unit-variance latents to save ~60 MB per 30k frames, not worth it.

The safetensors header names the codec's full weights hash, the dataset folder and the episode's
step count; a file whose header disagrees (another codec, a re-collected episode of another
length, a torn or foreign file) is re-encoded, never used. Files are written atomically, so a
killed encoding pass resumes where it stopped. The actions, rewards and terminations are still read
from the dataset (the source of truth; they are a few bytes per step).

What the key does not see: a dataset rewritten in place with episodes of the same lengths. Delete
`<run_dir>/latents` (or train with `--no-latent-cache`) after doing that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset
from tqdm import tqdm

from worldsim.data.episode_store import EpisodeStore
from worldsim.data.windows import WindowDataset
from worldsim.utils.atomic import atomic_write_bytes
from worldsim.utils.safetensors_io import safetensors_bytes

log = logging.getLogger(__name__)

FORMAT = "worldsim-latents"
VERSION = 1
CACHE_DIR = "latents"
ENCODE_CHUNK = 256
"""Frames encoded per codec call: bounds the activations' memory (~0.3 GB for the small codec)."""


def dataset_folder(root: Path, codec_sha: str, store: EpisodeStore) -> Path:
    """The cache folder of one dataset under one codec. The data path's hash keeps two datasets
    that share a name (e.g. one id in two MINARI_DATASETS_PATHs) apart."""
    where = str(store.data_path.resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", store.name.strip("/")).strip("_") or "dataset"
    return root / codec_sha[:16] / f"{slug}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def episode_file(folder: Path, episode: int) -> Path:
    return folder / f"episode_{episode:06d}.safetensors"


def _expected_header(codec_sha: str, store: EpisodeStore, episode: int) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": str(VERSION),
        "codec_sha256": codec_sha,
        "dataset": str(store.data_path.resolve()),
        "episode": str(episode),
        "steps": str(int(store.episode_steps[episode])),
    }


def stale_reason(path: Path, expected: dict[str, str], latent_shape: tuple[int, ...]) -> str | None:
    """Why the file at `path` cannot be used (None: it is the one `expected` describes)."""
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            shape = tuple(f.get_slice("latents").get_shape()) if "latents" in f.keys() else None
    except (SafetensorError, OSError, ValueError) as e:
        return f"unreadable ({e})"
    wrong = [k for k, v in expected.items() if header.get(k) != v]
    if wrong:
        return "header differs in " + ", ".join(f"{k} ({header.get(k)!r} != {expected[k]!r})" for k in wrong)
    want = (int(expected["steps"]), *latent_shape)
    if shape != want:
        return f"latents are {shape}, expected {want}"
    return None


@torch.no_grad()
def encode_episode(codec: torch.nn.Module, store: EpisodeStore, episode: int) -> torch.Tensor:
    """Latents (steps, C, h, w) float32 on the CPU of frames o_0 .. o_{steps-1} of one episode."""
    steps = int(store.episode_steps[episode])
    chunks = []
    for start in range(0, steps, ENCODE_CHUNK):
        frames = store.read(episode, start, min(ENCODE_CHUNK, steps - start))["frames"]  # (n, H, W, 3) uint8
        chunks.append(codec.encode(torch.from_numpy(frames)).float().cpu())  # (n, C, h, w)
    return torch.cat(chunks).contiguous()  # the codec may return channels-last memory


def build_latent_cache(
    stores: list[EpisodeStore],
    codec: torch.nn.Module,
    codec_sha: str,
    root: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[list[Path], int]:
    """Encode the episodes whose cache file is missing or stale; returns (one folder per store, files
    written by this rank). Under DDP each rank encodes every world_size-th missing episode: call a
    barrier before reading what the other ranks wrote."""
    root = Path(root)
    shape = tuple(codec.config.latent_shape)
    folders, todo = [], []
    for store in stores:
        folder = dataset_folder(root, codec_sha, store)
        folders.append(folder)
        for episode in range(len(store)):
            if int(store.episode_steps[episode]) < 1:
                continue
            expected = _expected_header(codec_sha, store, episode)
            reason = stale_reason(episode_file(folder, episode), expected, shape)
            if reason is not None:
                if reason != "missing" and rank == 0:
                    log.warning("latent cache %s: %s; re-encoding it", episode_file(folder, episode), reason)
                todo.append((store, folder, episode, expected))
    mine = todo[rank::world_size]
    if todo and rank == 0:
        log.info("latent cache: encoding %d of the datasets' episodes into %s", len(todo), root / codec_sha[:16])
    frames = sum(int(store.episode_steps[episode]) for store, _, episode, _ in mine)
    with tqdm(total=frames, desc="encoding latents", unit="frame", disable=not progress or not mine, dynamic_ncols=True) as bar:
        for store, folder, episode, expected in mine:
            latents = encode_episode(codec, store, episode)
            atomic_write_bytes(episode_file(folder, episode), safetensors_bytes({"latents": latents}, metadata=expected))
            bar.update(latents.shape[0])
    return folders, len(mine)


def check_latent_cache(folders: list[Path], stores: list[EpisodeStore], codec_sha: str, latent_shape: tuple[int, ...]) -> None:
    """ValueError naming the first episode (with windows) whose cache file is missing or stale."""
    for folder, store in zip(folders, stores):
        for episode in range(len(store)):
            if int(store.episode_steps[episode]) < 1:
                continue
            reason = stale_reason(episode_file(folder, episode), _expected_header(codec_sha, store, episode), latent_shape)
            if reason is not None:
                raise ValueError(f"latent cache {episode_file(folder, episode)}: {reason} after the encoding pass")


class LatentWindowDataset(Dataset):
    """`WindowDataset` items with "latents" (T, C, h, w) float32 from the cache in place of "frames".

    Same indices, same (source, episode, start) per index, so `WindowSampler` / `StepBatches` give
    the same windows as on raw frames and exact resume is unchanged. Cache files are memory-mapped
    lazily in each process (a pickled dataset reopens them in its DataLoader worker).
    """

    def __init__(self, windows: WindowDataset, folders: list[Path], max_open: int = 64) -> None:
        if len(folders) != len(windows.stores):
            raise ValueError(f"{len(folders)} cache folders for {len(windows.stores)} datasets")
        self.windows, self.folders, self.max_open = windows, list(folders), max_open
        self._open: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.windows)

    def _file(self, source: int, episode: int):
        key = (source, episode)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        handle = safe_open(str(episode_file(self.folders[source], episode)), framework="pt")
        self._open[key] = handle
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def latents(self, source: int, episode: int, start: int) -> torch.Tensor:
        """(T, C, h, w) float32: the cached latents of frames start .. start + T - 1."""
        return self._file(source, episode).get_slice("latents")[start : start + self.windows.window]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.windows[index]
        del item["frames"]  # read with the steps (the store reads rows whole); the latents replace them
        item["latents"] = self.latents(int(item["source"]), int(item["episode"]), int(item["start"]))
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # file handles do not cross processes
        return state

