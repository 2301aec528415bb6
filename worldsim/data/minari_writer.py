"""Append episodes to a Minari dataset so that a crash loses at most the episode in flight.

Every source (the live Memory Maze / Crafter envs, MineRL, VPT and TECO recordings) is written
through `DatasetWriter`, so every dataset this project makes is a plain Minari dataset that
`minari.load_dataset` opens.

Layout: Minari's "arrow" storage, one folder per episode (`data/<id>/part-0.arrow` plus that
episode's `metadata.json`), frames stored raw (no JPEG: a world model must not learn JPEG
artefacts). Arrow IPC files can be memory-mapped, which is what lets the window loader slice a
few frames out of an episode without reading the rest of it.

Commit protocol for one episode:
  1. Minari writes the episode into a private staging dataset (`<dataset>/.staging/`).
  2. The episode folder is renamed into `data/` (atomic on one filesystem).
  3. `data/metadata.json` is replaced atomically with the new episode and step counts.
A reader trusts only `total_episodes` from step 3, so a kill between steps leaves a folder that
`DatasetWriter` deletes when it next opens the dataset; the dataset stays readable throughout.

Integrity: each episode's metadata.json records the sha256 of its Arrow files as written; the
window loader checks them the first time it opens the episode (episodes written before hashes were
recorded are read unchecked).

Provenance: a new dataset records `requirements` (the worldsim, gymnasium and minari versions that
wrote it, which `MinariDataset.recover_environment` checks) and `code_permalink`: the writer's
`code_permalink=`, else $WORLDSIM_CODE_PERMALINK, else the package's repository URL when its
metadata names one, else a placeholder saying how to set it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.dataset.minari_storage import MinariStorage
from minari.serialization import serialize_space
from minari.storage.datasets_root_dir import get_dataset_path

import worldsim
from worldsim.utils.atomic import atomic_write_json, fsync_dir, sha256_file

METADATA_FILE = "metadata.json"
EPISODE_SHA256_KEY = "sha256"  # an episode's metadata.json: {arrow file name: hex sha256 as written}
NAMESPACE_FILE = "namespace_metadata.json"
PERMALINK_ENV_VAR = "WORLDSIM_CODE_PERMALINK"


def dataset_requirements() -> list[str]:
    """pip-style pins of the packages that wrote a dataset (Minari's `requirements`)."""
    out = [f"worldsim=={worldsim.__version__}"]
    for name in ("gymnasium", "minari"):
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return out


def default_code_permalink() -> str:
    """$WORLDSIM_CODE_PERMALINK, else the repository URL in worldsim's package metadata, else a
    placeholder that says how to set it."""
    if os.environ.get(PERMALINK_ENV_VAR):
        return os.environ[PERMALINK_ENV_VAR]
    try:
        for entry in md.metadata("worldsim").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("repository", "source", "homepage") and url.strip():
                return url.strip()
    except md.PackageNotFoundError:
        pass
    return (f"worldsim {worldsim.__version__} (no repository link recorded: set ${PERMALINK_ENV_VAR} "
            "or pass code_permalink= / --code-permalink)")


def datasets_root() -> Path:
    """Minari's local dataset folder (honours MINARI_DATASETS_PATH)."""
    return Path(get_dataset_path())


def dataset_dir(dataset_id: str, root: str | Path | None = None) -> Path:
    """The folder holding `data/` for `dataset_id` (e.g. 'worldsim/memory-maze-9x9-v0')."""
    try:
        parse_dataset_id(dataset_id)
    except Exception:  # noqa: BLE001 - minari's own errors (even a TypeError from int(None)) say less than this
        raise ValueError(
            f"invalid dataset id {dataset_id!r}: expected '[namespace/]name-v<version>', "
            f"e.g. 'worldsim/memory-maze-9x9-v0'"
        ) from None
    return (Path(root) if root is not None else datasets_root()) / dataset_id


@dataclass
class Episode:
    """One episode, in Minari's convention: one more observation than actions.

    observations: (T+1, ...) array, or a dict of such arrays for Dict observation spaces.
    actions:      (T, ...) array.
    rewards, terminations, truncations: (T,) arrays.
    infos:        dict of (T+1, ...) arrays (the reset info, then one per step); may be empty.
    metadata:     JSON-able per-episode facts (policy, source file, revisit indices...).
    """

    observations: Any
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    infos: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = len(self.actions)
        first_obs = (
            next(iter(self.observations.values()))
            if isinstance(self.observations, dict)
            else self.observations
        )
        checks = {
            "observations": (len(first_obs), steps + 1),
            "rewards": (len(self.rewards), steps),
            "terminations": (len(self.terminations), steps),
            "truncations": (len(self.truncations), steps),
        }
        checks.update({f"infos[{k!r}]": (len(v), steps + 1) for k, v in self.infos.items()})
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(
                    f"episode with {steps} actions needs {want} {name}, got {got}"
                )
        if steps == 0:
            raise ValueError("an episode needs at least one step")

    @property
    def num_steps(self) -> int:
        return len(self.actions)


class DatasetWriter:
    """Creates (or reopens, to resume) a Minari dataset and appends episodes atomically."""

    def __init__(
        self,
        dataset_id: str,
        observation_space: gym.Space,
        action_space: gym.Space,
        *,
        root: str | Path | None = None,
        env_spec: gym.envs.registration.EnvSpec | None = None,
        description: str = "",
        algorithm_name: str = "",
        extra_metadata: dict[str, Any] | None = None,
        code_permalink: str | None = None,
    ) -> None:
        self.dataset_id = dataset_id
        self.code_permalink = code_permalink
        self.path = dataset_dir(dataset_id, root)
        self.data_path = self.path / "data"
        self.staging_path = self.path / ".staging"
        self.observation_space = observation_space
        self.action_space = action_space
        if (self.data_path / METADATA_FILE).exists():
            self._check_compatible()
            self._discard_uncommitted()
        else:
            self._create(env_spec, description, algorithm_name, extra_metadata or {})

    # ----------------------------------------------------------------- creation / reopening
    def _create(
        self,
        env_spec: gym.envs.registration.EnvSpec | None,
        description: str,
        algorithm_name: str,
        extra_metadata: dict[str, Any],
    ) -> None:
        self._write_namespace_files()
        # Build the empty dataset in staging and move it into place in one rename, so a
        # half-created dataset is never visible under its id.
        shutil.rmtree(self.staging_path, ignore_errors=True)
        tmp_data = self.staging_path / "new-data"
        self.staging_path.mkdir(parents=True)
        MinariStorage.new(
            tmp_data,
            observation_space=self.observation_space,
            action_space=self.action_space,
            env_spec=env_spec,
            data_format="arrow",
            jpeg_encoding=False,
        )
        meta = _read_json(tmp_data / METADATA_FILE)
        meta.update(
            dataset_id=self.dataset_id,
            minari_version=minari.__version__,
            description=description or f"worldsim dataset {self.dataset_id}",
            algorithm_name=algorithm_name or "unknown",
            author=["worldsim"],
            requirements=dataset_requirements(),
            code_permalink=self.code_permalink or default_code_permalink(),
            **extra_metadata,
        )
        if env_spec is not None:
            meta["eval_env_spec"] = meta.get("env_spec")
        atomic_write_json(tmp_data / METADATA_FILE, meta)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp_data.rename(self.data_path)
        fsync_dir(self.path)

    def _write_namespace_files(self) -> None:
        # Minari lists a namespace only if each level has its metadata file.
        namespaces = self.dataset_id.split("/")[:-1]
        level = self.path.parents[len(namespaces)]  # the datasets root
        for name in namespaces:
            level = level / name
            if not (level / NAMESPACE_FILE).exists():
                atomic_write_json(level / NAMESPACE_FILE, {})

    def _check_compatible(self) -> None:
        meta = _read_json(self.data_path / METADATA_FILE)
        if meta.get("data_format") != "arrow" or meta.get("jpeg_encoding", True):
            raise ValueError(
                f"{self.data_path}: can only append to raw-frame arrow datasets written by "
                f"worldsim (found data_format={meta.get('data_format')!r}, "
                f"jpeg_encoding={meta.get('jpeg_encoding', True)})"
            )
        for name, space in (("observation", self.observation_space), ("action", self.action_space)):
            if meta.get(f"{name}_space") != serialize_space(space):
                raise ValueError(
                    f"{self.data_path}: existing dataset has a different {name} space; "
                    f"use a new dataset id instead of appending to this one"
                )

    def _discard_uncommitted(self) -> None:
        committed = self.total_episodes
        for child in self.data_path.iterdir():
            if child.is_dir() and child.name.isdigit() and int(child.name) >= committed:
                shutil.rmtree(child)
        shutil.rmtree(self.staging_path, ignore_errors=True)

    # ------------------------------------------------------------------------------- state
    @property
    def metadata(self) -> dict[str, Any]:
        return _read_json(self.data_path / METADATA_FILE)

    @property
    def total_episodes(self) -> int:
        return int(self.metadata["total_episodes"])

    @property
    def total_steps(self) -> int:
        return int(self.metadata["total_steps"])

    def episode_metadata(self) -> list[dict[str, Any]]:
        """Per-episode metadata of every committed episode, in id order."""
        return [
            _read_json(self.data_path / str(i) / METADATA_FILE) for i in range(self.total_episodes)
        ]

    def update_dataset_metadata(self, **values: Any) -> None:
        meta = self.metadata
        meta.update(values)
        atomic_write_json(self.data_path / METADATA_FILE, meta)

    # ------------------------------------------------------------------------------ append
    def append(self, episode: Episode) -> int:
        """Commit one episode; returns its id."""
        episode_id = self.total_episodes
        shutil.rmtree(self.staging_path, ignore_errors=True)
        staging = MinariStorage.new(
            self.staging_path,
            observation_space=self.observation_space,
            action_space=self.action_space,
            data_format="arrow",
            jpeg_encoding=False,
        )
        staging.update_episodes(
            [
                EpisodeBuffer(
                    id=episode_id,
                    seed=episode.seed,
                    observations=episode.observations,
                    actions=np.asarray(episode.actions),
                    rewards=np.asarray(episode.rewards, dtype=np.float64),
                    terminations=np.asarray(episode.terminations, dtype=bool),
                    truncations=np.asarray(episode.truncations, dtype=bool),
                    infos=_arrow_safe_infos(episode.infos) or None,
                )
            ]
        )
        episode_path = self.staging_path / str(episode_id)
        ep_meta = _read_json(episode_path / METADATA_FILE)
        ep_meta.update(episode.metadata)
        # Checked by the readers (`EpisodeStore`): bytes that change on disk after this point
        # (a bad copy, a stray write) stop training with the file named instead of going unnoticed.
        ep_meta[EPISODE_SHA256_KEY] = {f.name: sha256_file(f) for f in sorted(episode_path.glob("*.arrow"))}
        atomic_write_json(episode_path / METADATA_FILE, ep_meta)

        target = self.data_path / str(episode_id)
        shutil.rmtree(target, ignore_errors=True)  # leftover of a crash between rename and commit
        episode_path.rename(target)
        fsync_dir(self.data_path)

        meta = self.metadata
        meta["total_episodes"] = episode_id + 1
        meta["total_steps"] = int(meta["total_steps"]) + episode.num_steps
        meta["dataset_size"] = round(_folder_bytes(self.data_path) / 1e6, 1)  # MB, as Minari
        atomic_write_json(self.data_path / METADATA_FILE, meta)
        shutil.rmtree(self.staging_path, ignore_errors=True)
        return episode_id


def _arrow_safe_infos(infos: dict[str, Any]) -> dict[str, Any]:
    # Minari 0.5.4's arrow storage records a per-step scalar's shape as "" and cannot parse it
    # back; given a plain list it stores a flat column that reads back as a (T+1,) array.
    return {
        k: (v.tolist() if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in infos.items()
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not a Minari dataset folder?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt JSON ({e})") from None


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
