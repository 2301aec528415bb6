"""Fixed-length training windows over one or more Minari datasets, as a PyTorch map-style dataset.

Window convention. An episode of N steps holds N actions and N + 1 observations. The window of
length T starting at step s holds
    frames        o_s .. o_{s+T-1}           uint8 (T, H, W, C)
    actions       a_s .. a_{s+T-1}           int64 (T,) Discrete | float32 (T, *shape) Box
    rewards       r_s .. r_{s+T-1}           float32 (T,)
    terminations, truncations of those steps bool (T,)
where a_t is the action taken at frame o_t, r_t the reward it earned, and termination t says that
o_{t+1} is terminal. So frame t + 1 of the window is the consequence of action t. Valid starts are
s = 0, stride, 2 * stride, ... <= N - T: windows never cross an episode end, and episodes shorter
than T are skipped. The final observation o_N is never part of a window.

Each item also carries "episode", "start" (the window's place in its dataset) and "source" (the
dataset's index in `sources`), all int64 scalars.

Items depend only on their index, and `WindowSampler` orders indices from a seed alone, so
`DataLoader(ds, sampler=WindowSampler(ds, seed=...), num_workers=k)` gives the same batches for
any k. Storage is opened lazily in each worker process (see `episode_store`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from minari.serialization import serialize_space
from torch.utils.data import Dataset, Sampler

from worldsim.data.episode_store import DatasetError, EpisodeStore

Source = str | os.PathLike


def _action_space_key(space) -> str:
    return serialize_space(space)


class WindowDataset(Dataset):
    """Every (episode, start) window of `window` consecutive steps, over several datasets."""

    def __init__(
        self,
        sources: Source | Sequence[Source],
        window: int,
        *,
        stride: int = 1,
        image_key: str | None = None,
        max_open_episodes: int = 64,
    ) -> None:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        if not sources:
            raise ValueError("WindowDataset needs at least one dataset")
        if window < 1 or stride < 1:
            raise ValueError(f"window and stride must be >= 1 (got {window} and {stride})")
        self.window = int(window)
        self.stride = int(stride)
        self.stores = [
            EpisodeStore(s, image_key=image_key, max_open_episodes=max_open_episodes)
            for s in sources
        ]
        self._check_compatible()
        self._index_windows()

    def _check_compatible(self) -> None:
        first = self.stores[0]
        first_actions = _action_space_key(first.action_space)
        for other in self.stores[1:]:
            if _action_space_key(other.action_space) != first_actions:
                raise DatasetError(
                    f"datasets {first.name!r} and {other.name!r} have different action spaces "
                    f"({first.action_space} vs {other.action_space})"
                )
            if other.frame_shape != first.frame_shape:
                raise DatasetError(
                    f"datasets {first.name!r} and {other.name!r} have different frame shapes "
                    f"({first.frame_shape} vs {other.frame_shape})"
                )

    def _index_windows(self) -> None:
        """Flat index -> (source, episode, start), kept as three small arrays per episode."""
        sources, episodes, counts = [], [], []
        for source, store in enumerate(self.stores):
            steps = store.episode_steps
            n_windows = np.where(steps >= self.window, (steps - self.window) // self.stride + 1, 0)
            keep = np.nonzero(n_windows)[0]
            sources.append(np.full(len(keep), source, dtype=np.int64))
            episodes.append(keep.astype(np.int64))
            counts.append(n_windows[keep].astype(np.int64))
        self._episode_source = np.concatenate(sources)
        self._episode_id = np.concatenate(episodes)
        counts = np.concatenate(counts)
        if counts.sum() == 0:
            longest = max(int(s.episode_steps.max(initial=0)) for s in self.stores)
            names = ", ".join(repr(s.name) for s in self.stores)
            raise DatasetError(
                f"no episode in {names} has {self.window} steps for one window; "
                f"the longest has {longest}"
            )
        # _first_index[k] = flat index of the first window of kept episode k.
        self._first_index = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self._first_index[-1])

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.stores[0].frame_shape

    @property
    def action_space(self):
        return self.stores[0].action_space

    def locate(self, index: int) -> tuple[int, int, int]:
        """(source, episode, start) of window `index`."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"window index {index} out of range for {n} windows")
        k = int(np.searchsorted(self._first_index, index, side="right")) - 1
        start = (index - int(self._first_index[k])) * self.stride
        return int(self._episode_source[k]), int(self._episode_id[k]), start

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source, episode, start = self.locate(int(index))
        steps = self.stores[source].read(episode, start, self.window)
        item = {name: torch.from_numpy(array) for name, array in steps.items()}
        item["episode"] = torch.tensor(episode, dtype=torch.int64)
        item["start"] = torch.tensor(start, dtype=torch.int64)
        item["source"] = torch.tensor(source, dtype=torch.int64)
        return item

    def close(self) -> None:
        for store in self.stores:
            store.close()


class WindowSampler(Sampler[int]):
    """A random order of window indices that depends only on (seed, epoch).

    Draws `num_samples` indices per epoch (default: one pass over the dataset): successive
    permutations without replacement, or uniform draws with `replacement=True`. With
    `world_size > 1` each rank takes every world_size-th index of the same order, so DDP ranks see
    disjoint windows; the order is padded by wrapping so every rank gets as many.
    """

    def __init__(
        self,
        dataset_or_len: Dataset | int,
        *,
        seed: int,
        num_samples: int | None = None,
        replacement: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size = dataset_or_len if isinstance(dataset_or_len, int) else len(dataset_or_len)
        if self.size < 1:
            raise ValueError("WindowSampler needs a dataset with at least one window")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.seed = int(seed)
        self.num_samples = self.size if num_samples is None else int(num_samples)
        self.replacement = replacement
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new order for each epoch, still reproducible from the seed."""
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = -(-self.num_samples // self.world_size) * self.world_size  # ceil to ranks
        if self.replacement:
            return rng.integers(0, self.size, total)
        passes = -(-total // self.size)
        return np.concatenate([rng.permutation(self.size) for _ in range(passes)])[:total]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)
