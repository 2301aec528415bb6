"""Collect a Minari dataset by running exploration policies in the real envs, in parallel.

Worker processes (one env each, reused across episodes) run whole episodes and send them to the
main process, the only writer: it commits each finished episode with `DatasetWriter`, atomically.
Episode `i` resets the env with seed `seed + i` and seeds its policy with the same number, so any
episode can be regenerated from the dataset's metadata.

Resuming: the dataset's metadata records the collection config and every committed episode
records its `episode_index`; re-running the same command runs only the missing indices. A kill
(even SIGKILL) loses at most the episodes in flight and those finished but waiting for an earlier
one. Ctrl-C / SIGTERM are deferred until the current commit has finished, then the workers are
stopped and `CollectionInterrupted` is raised.

Episodes are committed in `episode_index` order whatever order the workers finish them in (a
finished episode waits in memory for the earlier ones), so in a dataset made by `collect`, episode
id i is the episode of seed `seed + i`, on a resumed run too (datasets written before this ordering,
whose ids followed finishing order, keep their ids; `episode_index` in each episode's metadata says).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import worldsim.envs  # noqa: F401 (registers the worldsim/ env ids that collection makes)
from worldsim.data.exploration import POLICIES, ExplorationPolicy
from worldsim.data.revisits import find_revisits
from worldsim.data.minari_writer import METADATA_FILE, DatasetWriter, Episode, dataset_dir

POLICY_CHOICES = ("random", "navigator", "revisit", "spin", "mixed")
MIXED_POLICIES = ("random", "navigator", "revisit")

# `find_revisits` settings for the `revisits` stored with each episode (positions in grid cells).
REVISIT_SEARCH = {"min_gap": 50, "pos_tol": 0.5, "dir_tol_deg": 30.0}
# Info keys holding the agent's pose, per env family: (position key, heading key).
POSE_INFO_KEYS = (("agent_pos", "agent_dir"), ("player_pos", "player_facing"))

# The settings that make an episode what it is: a dataset resumes only with the same values.
RESUME_KEYS = ("env_id", "policy", "max_steps", "seed")
CONFIG_METADATA_KEY = "worldsim_collect"

PROGRESS_EVERY = 50  # steps between a worker's progress messages


@dataclass
class CollectConfig:
    env_id: str = "worldsim/MemoryMaze-9x9-v0"
    """Gymnasium id of the env to run: worldsim/MemoryMaze-{9x9,11x11,13x13,15x15}-v0 or
    worldsim/Crafter-v0 (`worldsim.envs.REAL_ENV_IDS`)."""
    policy: str = "mixed"
    """random (any env); navigator, revisit, spin (Memory Maze); mixed: one per episode of random,
    navigator, revisit."""
    episodes: int = 10
    """Episodes the dataset should hold; episode i uses seed `seed + i`."""
    workers: int = 2
    """Worker processes, each with one env reused across its episodes."""
    max_steps: int | None = None
    """Cut episodes after this many steps (marked truncated); None = the env's own time limit."""
    seed: int = 0
    """Base seed: episode i resets the env and seeds its policy with `seed + i`."""
    dataset_id: str = "worldsim/memory-maze-9x9-v0"
    """Minari id, '[namespace/]name-v<version>'; re-running with it resumes the collection."""
    root: str | None = None
    """Folder of Minari datasets; None = MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    description: str = ""
    """Free-text description stored in the dataset's metadata."""
    progress: bool = True
    """Show a progress bar (steps/s, episodes committed) on stderr."""
    code_permalink: str | None = None
    """Link to the code that made the dataset (Minari's `code_permalink`); None: $WORLDSIM_CODE_PERMALINK,
    else a placeholder (`worldsim.data.minari_writer.default_code_permalink`)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name, low in (("episodes", 1), ("workers", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        steps = self.max_steps
        bad_steps = isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        if steps is not None and bad_steps:
            raise ValueError(f"max_steps must be None or an integer >= 1, got {self.max_steps!r}")
        if self.policy not in POLICY_CHOICES:
            raise ValueError(f"policy must be one of {POLICY_CHOICES}, got {self.policy!r}")
        dataset_dir(self.dataset_id, self.root)  # raises on a malformed id
        env_spec(self.env_id)


@dataclass
class CollectSummary:
    dataset_id: str
    path: Path
    episodes_in_dataset: int
    episodes_written: int
    episodes_skipped: int
    """Requested episodes that were already committed by an earlier run."""
    steps_written: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.steps_written / self.seconds if self.seconds > 0 else 0.0


class CollectionError(RuntimeError):
    """A worker failed; the dataset keeps every episode committed before the failure."""


class CollectionInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: workers stopped, committed episodes kept; re-run to continue."""

    def __init__(self, summary: CollectSummary) -> None:
        super().__init__(
            f"interrupted: {summary.episodes_in_dataset} episodes committed in {summary.path}; "
            "re-run the same command to continue"
        )
        self.summary = summary


def env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of `env_id`; 'module:id' imports `module` first, as `gym.make` does."""
    module, _, name = env_id.rpartition(":")
    try:
        if module:
            importlib.import_module(module)
        return gym.spec(name)
    except (gym.error.Error, ImportError) as e:
        known = ", ".join(worldsim.envs.REAL_ENV_IDS)
        raise ValueError(f"unknown env id {env_id!r} ({e}); worldsim's envs: {known}") from None


# ------------------------------------------------------------------------------ one episode
def make_policy(policy: str, rng: np.random.Generator) -> ExplorationPolicy:
    """The policy for one episode; 'mixed' draws one of MIXED_POLICIES with `rng`."""
    if policy == "mixed":
        policy = MIXED_POLICIES[rng.integers(len(MIXED_POLICIES))]
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICY_CHOICES}, got {policy!r}")
    return POLICIES[policy]()


def has_maze_layout(env: gym.Env) -> bool:
    return hasattr(type(env.unwrapped), "maze_layout") or hasattr(env.unwrapped, "maze_layout")


def check_policy_fits_env(policy: str, env: gym.Env) -> None:
    needs_maze = policy == "mixed" or POLICIES[policy].requires_maze
    if needs_maze and not has_maze_layout(env):
        raise ValueError(
            f"policy {policy!r} needs a Memory Maze env (it plans on the maze layout); "
            f"{env.spec.id if env.spec else env} has none: use --policy random"
        )


def run_episode(
    env: gym.Env,
    policy_name: str,
    *,
    episode_index: int,
    seed: int,
    max_steps: int | None,
    on_steps: Callable[[int], None] | None = None,
) -> Episode:
    """Run one episode with env seed and policy seed `seed`; returns it with its metadata.

    `on_steps(n)` is called every PROGRESS_EVERY steps (and at the end) with the steps since
    the previous call.
    """
    rng = np.random.default_rng(seed)
    policy = make_policy(policy_name, rng)
    obs, info = env.reset(seed=seed)
    policy.reset(env, info, rng)
    maze_layout = np.asarray(env.unwrapped.maze_layout) if has_maze_layout(env) else None

    observations, infos = [obs], [info]
    actions, rewards, terminations, truncations = [], [], [], []
    reported = 0
    while True:
        action = policy.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        cut = max_steps is not None and len(actions) + 1 >= max_steps
        observations.append(obs)
        infos.append(info)
        actions.append(action)
        rewards.append(reward)
        terminations.append(terminated)
        truncations.append(truncated or (cut and not terminated))
        if on_steps is not None and len(actions) - reported >= PROGRESS_EVERY:
            on_steps(len(actions) - reported)
            reported = len(actions)
        if terminated or truncated or cut:
            break
    if on_steps is not None and len(actions) > reported:
        on_steps(len(actions) - reported)

    stacked_infos = stack_infos(infos)
    metadata: dict[str, Any] = {
        "episode_index": episode_index,
        "env_seed": seed,
        "policy_seed": seed,
        "policy": policy.name,
        "policy_params": policy.params(),
        "num_steps": len(actions),
        "episode_return": float(np.sum(rewards)),
        "revisits": [list(pair) for pair in episode_revisits(stacked_infos)],
    }
    if hasattr(policy, "planned_revisits"):
        metadata["planned_revisits"] = [list(pair) for pair in policy.planned_revisits]
    if maze_layout is not None:
        metadata["maze_layout"] = maze_layout.tolist()
    return Episode(
        observations=np.stack(observations),
        actions=np.asarray(actions, dtype=np.int64),
        rewards=np.asarray(rewards, dtype=np.float64),
        terminations=np.asarray(terminations, dtype=bool),
        truncations=np.asarray(truncations, dtype=bool),
        infos=stacked_infos,
        seed=seed,
        metadata=metadata,
    )


def stack_infos(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step info dicts -> one (T+1, ...) array per key; the keys and shapes must not change."""
    keys = list(infos[0])
    stacked = {}
    for key in keys:
        values = []
        for step, info in enumerate(infos):
            if key not in info:
                raise ValueError(f"info key {key!r} is missing at step {step} (present at reset)")
            values.append(np.asarray(info[key]))
        shapes = {v.shape for v in values}
        if len(shapes) > 1:
            raise ValueError(f"info key {key!r} changes shape during the episode: {sorted(shapes)}")
        stacked[key] = np.stack(values)
    for step, info in enumerate(infos):
        extra = set(info) - set(keys)
        if extra:
            raise ValueError(f"info keys {sorted(extra)} appear at step {step} but not at reset")
    return stacked


def episode_revisits(infos: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """Revisits found post hoc from the pose in the infos; [] for envs that report no pose."""
    for pos_key, dir_key in POSE_INFO_KEYS:
        if pos_key in infos and dir_key in infos:
            return find_revisits(infos[pos_key], infos[dir_key], **REVISIT_SEARCH)
    return []


# --------------------------------------------------------------------------------- workers
def _worker_main(
    worker_id: int,
    config: CollectConfig,
    tasks: mp.Queue,
    results: mp.Queue,
    running: Any,
) -> None:
    """Run episodes from `tasks` until a None arrives. `running[worker_id]` (shared memory) holds
    the episode in progress, -1 when idle: a queued message could die with a crashed process."""
    # Ctrl-C reaches the whole process group; only the main process decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        env = gym.make(config.env_id)
        check_policy_fits_env(config.policy, env)
    except Exception as e:
        results.put(("error", worker_id, None, _describe(e)))
        return
    results.put(("ready", worker_id, env.observation_space, env.action_space))

    def report_steps(n: int) -> None:
        _exit_if_orphaned()
        results.put(("steps", worker_id, n))

    while (index := _next_task(tasks)) is not None:
        running[worker_id] = index
        try:
            episode = run_episode(
                env,
                config.policy,
                episode_index=index,
                seed=config.seed + index,
                max_steps=config.max_steps,
                on_steps=report_steps,
            )
        except Exception as e:
            results.put(("error", worker_id, index, _describe(e)))
            return
        results.put(("episode", worker_id, index, episode))
        running[worker_id] = -1
    env.close()
    results.put(("done", worker_id))


def _exit_if_orphaned() -> None:
    # A main process killed with SIGKILL cannot stop its workers: they notice and quit instead
    # of running on as orphans blocked on queues nobody reads.
    if not mp.parent_process().is_alive():
        os._exit(1)


def _next_task(tasks: mp.Queue) -> int | None:
    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            _exit_if_orphaned()


def _describe(error: Exception) -> tuple[bool, str]:
    """(is it bad input?, message): a ValueError is a config problem, reported without a
    traceback; anything else is a failure, reported with the worker's traceback."""
    if isinstance(error, ValueError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"


# -------------------------------------------------------------------------------- collect
def collect(config: CollectConfig) -> CollectSummary:
    """Run the missing episodes of `config` and commit them; returns what was done."""
    config.validate()
    spec = env_spec(config.env_id)
    path = dataset_dir(config.dataset_id, config.root)
    start = time.monotonic()
    with _exclusive(path), _deferred_stop_signals() as stop_requested:
        committed = committed_episode_indices(path, config)
        todo = [i for i in range(config.episodes) if i not in committed]
        summary = CollectSummary(
            dataset_id=config.dataset_id,
            path=path,
            episodes_in_dataset=len(committed),
            episodes_written=0,
            episodes_skipped=config.episodes - len(todo),
            steps_written=0,
            seconds=0.0,
        )
        if todo:
            _run_workers(config, spec, path, todo, summary, stop_requested, start)
    summary.seconds = time.monotonic() - start
    return summary


def _run_workers(
    config: CollectConfig,
    spec: gym.envs.registration.EnvSpec,
    path: Path,
    todo: list[int],
    summary: CollectSummary,
    stop_requested: threading.Event,
    start: float,
) -> None:
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    n_workers = min(config.workers, len(todo))
    running = ctx.Array("q", [-1] * n_workers, lock=False)
    for index in todo:
        tasks.put(index)
    for _ in range(n_workers):
        tasks.put(None)  # one stop marker per worker
    workers = {
        wid: ctx.Process(
            target=_worker_main,
            args=(wid, config, tasks, results, running),
            name=f"collect-worker-{wid}",
        )
        for wid in range(n_workers)
    }
    for process in workers.values():
        process.start()

    # The dataset is created when the first episode arrives: a run that fails before any
    # episode is finished leaves nothing behind.
    writer: DatasetWriter | None = None
    spaces: tuple[gym.Space, gym.Space] | None = None
    finished: set[int] = set()
    waiting: dict[int, Any] = {}  # finished episodes whose earlier indices are still running
    next_pos = 0  # todo[next_pos] is the next episode to commit
    steps_per_episode = config.max_steps or spec.max_episode_steps
    bar = tqdm(
        total=len(todo) * steps_per_episode if steps_per_episode else None,
        unit="step",
        desc=f"collect {config.dataset_id}",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    bar.set_postfix_str(f"episodes {summary.episodes_in_dataset}/{config.episodes}")
    try:
        while len(finished) < n_workers:
            if stop_requested.is_set():
                summary.seconds = time.monotonic() - start
                raise CollectionInterrupted(summary)
            try:
                message = results.get(timeout=0.25)
            except queue.Empty:
                if not stop_requested.is_set():  # Ctrl-C also reaches workers still starting
                    _check_alive(workers, finished, running, config, summary)
                continue
            kind, wid = message[0], message[1]
            if kind == "ready":
                spaces = (message[2], message[3])
            elif kind == "steps":
                bar.update(message[2])
            elif kind == "episode":
                _, _, index, episode = message
                waiting[index] = episode
                # Commit in index order: episode id i of the dataset is the episode of seed + i.
                while next_pos < len(todo) and todo[next_pos] in waiting:
                    episode = waiting.pop(todo[next_pos])
                    next_pos += 1
                    if writer is None:
                        assert spaces is not None, "a worker sends 'ready' before its episodes"
                        writer = _open_writer(config, spec, *spaces)
                    writer.append(episode)
                    summary.episodes_written += 1
                    summary.episodes_in_dataset += 1
                    summary.steps_written += episode.num_steps
                    bar.set_postfix_str(f"episodes {summary.episodes_in_dataset}/{config.episodes}")
            elif kind == "error":
                _, _, index, (bad_input, details) = message
                if index is None and bad_input:
                    raise ValueError(details)
                where = (
                    f"episode {index} (seed {config.seed + index})"
                    if index is not None
                    else "env creation"
                )
                raise CollectionError(
                    f"worker {wid} failed during {where} of {config.env_id}: {details}\n"
                    f"{_committed_note(summary)}"
                )
            elif kind == "done":
                finished.add(wid)
    finally:
        bar.close()
        _stop(workers.values())
        for q in (tasks, results):
            q.cancel_join_thread()  # undelivered items must not block our exit
            q.close()


def _check_alive(
    workers: dict[int, Any],
    finished: set[int],
    running: Any,
    config: CollectConfig,
    summary: CollectSummary,
) -> None:
    # Runs only after the result queue stayed empty, so a worker that exited normally has
    # already delivered its 'done' message.
    for wid, process in workers.items():
        if wid not in finished and not process.is_alive():
            index = running[wid]
            where = ""
            if index >= 0:
                where = f" while running episode {index} (seed {config.seed + index})"
            raise CollectionError(
                f"worker {wid} died with exit code {process.exitcode}{where}; "
                f"{_committed_note(summary)}"
            )


def _committed_note(summary: CollectSummary) -> str:
    if summary.episodes_in_dataset == 0:
        return "no episode was committed"
    return f"{summary.episodes_in_dataset} committed episodes are kept in {summary.path}"


def _stop(processes: Any) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()  # its episode in flight is lost, by design
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def _open_writer(
    config: CollectConfig,
    spec: gym.envs.registration.EnvSpec,
    observation_space: gym.Space,
    action_space: gym.Space,
) -> DatasetWriter:
    recorded = {
        **{key: getattr(config, key) for key in RESUME_KEYS},
        "episodes": config.episodes,
        "revisit_search": REVISIT_SEARCH,
    }
    writer = DatasetWriter(
        config.dataset_id,
        observation_space,
        action_space,
        root=config.root,
        env_spec=spec,
        description=config.description or f"{config.policy} exploration in {config.env_id}",
        algorithm_name=f"worldsim collect --policy {config.policy}",
        extra_metadata={CONFIG_METADATA_KEY: recorded},
        code_permalink=config.code_permalink,
    )
    if writer.metadata[CONFIG_METADATA_KEY] != recorded:  # resumed, perhaps with more episodes
        writer.update_dataset_metadata(**{CONFIG_METADATA_KEY: recorded})
    return writer


def committed_episode_indices(path: Path, config: CollectConfig) -> set[int]:
    """`episode_index` of every committed episode; checks the dataset was collected like `config`.

    Only episodes below the dataset's `total_episodes` count: anything above is an uncommitted
    leftover of a killed run, which `DatasetWriter` deletes on reopening.
    """
    meta_path = path / "data" / METADATA_FILE
    if not meta_path.exists():
        return set()
    meta = _read_json(meta_path)
    recorded = meta.get(CONFIG_METADATA_KEY)
    if recorded is None:
        raise ValueError(
            f"dataset {config.dataset_id!r} at {path} was not made by `worldsim collect`; "
            "choose another dataset id"
        )
    differences = [
        f"{key}: dataset has {recorded.get(key)!r}, this run asks for {getattr(config, key)!r}"
        for key in RESUME_KEYS
        if recorded.get(key) != getattr(config, key)
    ]
    if differences:
        raise ValueError(
            f"dataset {config.dataset_id!r} at {path} was collected with other settings "
            f"({'; '.join(differences)}); re-run with the same settings to resume it, "
            "or choose another dataset id"
        )
    indices: set[int] = set()
    for episode_id in range(int(meta["total_episodes"])):
        episode_meta = _read_json(path / "data" / str(episode_id) / METADATA_FILE)
        indices.add(int(episode_meta["episode_index"]))
    return indices


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Refuse to run two collections into one dataset at once (they would both append)."""
    lock_path = path.with_name(f".{path.name}.collect-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another `worldsim collect` is writing {path} (it holds {lock_path})"
            ) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # the kernel drops the lock itself on any exit


@contextmanager
def _deferred_stop_signals() -> Iterator[threading.Event]:
    """SIGINT / SIGTERM set an event instead of raising, so a commit is never cut in half."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

