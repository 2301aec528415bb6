"""`Viewer`: play a world model's dream with the keyboard (the pygame loop of `worldsim play`).

One loop iteration ("frame") is: `handle_events` (keys change state and record intents), `update`
(at most one dream step, with the action of the held keys or of the agent), `draw` (the real env
on the left when shown, the dream on the right, an overlay with fps / latency / mode). `run` repeats that at `fps`; tests
drive the same loop with scripted events (`run(events=...)`) or call the three steps themselves.

The dream is a `RolloutSession` of batch 1, started from a real context clip. It is not wrapped in
`DreamEnv` on purpose: a viewer shows the model's predicted termination instead of obeying it (a
Memory Maze episode never terminates, so a predicted one is a model error worth watching), and
the user starts a new context with R.

The real side's Memory Maze must not render in this process: MuJoCo's OpenGL (EGL) and pygame's
window break each other in one process. `worldsim play` runs it in a worker process
(`SubprocessEnv`, see envs/subprocess_env.py); so should any other caller with a real window.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pygame

from worldsim.envs.dream import MemoryMazeContext
from worldsim.envs.subprocess_env import SubprocessEnv
from worldsim.rollout.session import RolloutSession
from worldsim.utils.labels import label_panels
from worldsim.viewer.keymap import CONTROLS, CONTROLS_HELP, Keymap, keymap_for
from worldsim.viewer.policies import Policy, RandomWalk
from worldsim.viewer.real_side import RealSide
from worldsim.viewer.recorder import VideoRecorder

SEED_BOUND = 2**63 - 1
LINE_HEIGHT = 16
OVERLAY_ROWS = 7  # fixed, so the window keeps its size; overlay lines are wrapped into these
TEXT_COLOUR = (235, 235, 235)
PANEL_COLOUR = (24, 24, 24)
PANEL_LABELS = ("real", "dream")  # left to right, as in `worldsim dream`'s videos
MISSING_COLOUR = 48  # grey panel in recordings where the real side is hidden
NO_REAL = "no real side: it needs the live Memory Maze context"  # one overlay row at the default scale


@dataclass
class ViewerConfig:
    context_frames: int = 9
    """Real frames prefilled before the dream starts (and after each reset)."""
    sampler_steps: int = 2
    """Denoiser calls per dreamed frame."""
    fps: float = 10.0
    """Loop rate cap (one dream step per frame while running); 0: as fast as the model goes."""
    scale: int = 6
    """Integer upscaling of the frames on screen and in recordings (64 px -> 384 px)."""
    seed: int = 0
    """Fixes the sequence of context clips and the sampler's noise."""
    show_real: bool = True
    """Start with the real env beside the dream (needs a Memory Maze context; V toggles)."""
    record_path: str | os.PathLike | None = None
    """Record from the start to this .mp4 / .gif. C starts / stops takes: the first goes to this
    path (default worldsim-play.mp4 in the working folder), later ones to <stem>-2, -3..."""
    record_fps: float | None = None
    """Frame rate written in the video (default: `fps`, or 4 = Memory Maze's rate when fps is 0)."""


class Viewer:
    """The keyboard viewer; see the module doc. `context`: a `ContextSource` of `worldsim.envs.dream`.
    The real side is available when the context is a `MemoryMazeContext` whose env renders
    rgb_array (it is then the very env the context clips come from)."""

    def __init__(self, model, codec, context, config: ViewerConfig | None = None, *,
                 keymap: Keymap | None = None, policy: Policy | None = None) -> None:
        self.cfg = cfg = config or ViewerConfig()
        if cfg.scale < 1 or cfg.fps < 0 or cfg.context_frames < 1:
            raise ValueError(f"need scale >= 1, fps >= 0, context_frames >= 1; got {cfg}")
        if model.cfg.action_kind != "discrete":
            raise ValueError("the viewer plays discrete-action models; this one takes continuous actions")
        n_actions = model.cfg.n_actions
        self.keymap = keymap or keymap_for(n_actions)
        if len(self.keymap.action_names) != n_actions:
            raise ValueError(f"keymap {self.keymap.name!r} has {len(self.keymap.action_names)} actions, "
                             f"the model {n_actions}")
        self.session = RolloutSession(model, codec, batch=1, sampler_steps=cfg.sampler_steps)
        self.context = context
        self.rng = np.random.default_rng(cfg.seed)
        self.policy = policy or RandomWalk(n_actions, seed=cfg.seed)
        # Only the env the clips come from stands where the dream starts (see real_side.py).
        maze = isinstance(context, MemoryMazeContext) and context.env.render_mode == "rgb_array"
        self.real = RealSide(context.env) if maze else None
        self.show_real = cfg.show_real and self.real is not None

        # loop state
        self.running = True
        self.paused = False
        self.mode = "human"  # or "agent"
        self.held: set[int] = set()  # game keys down now
        self.tapped: set[int] = set()  # game keys pressed since the last dream step
        self._step_once = False
        self._reset_requested = False
        self.status = NO_REAL if cfg.show_real and self.real is None else ""  # one line of news

        # episode state
        self.episode = 0
        self.frame: np.ndarray | None = None  # (H, W, 3) uint8, the dream's current frame
        self.t = 0
        self.actions: list[int] = []  # sent to the model this episode
        self.reward = 0.0
        self.total_reward = 0.0
        self.terminated = False
        self.step_ms = 0.0
        self._frame_times: deque[float] = deque(maxlen=30)

        # recording
        self.recorder: VideoRecorder | None = None
        self._record_with_real = False
        self._takes = 0
        self.saved: list[Path] = []

        self._drew = False  # opened (or drew into) pygame's window
        self._font: pygame.font.Font | None = None
        pygame.display.init()  # also needed to post events; audio and joystick are not
        pygame.font.init()
        if self.real is not None and _renders_here(context.env) and pygame.display.get_driver() != "dummy":
            warnings.warn("the real side's Memory Maze renders with OpenGL in this process, which breaks "
                          "pygame's window (and vice versa): create it in a worker process with "
                          "SubprocessEnv(MemoryMazeEnv, render_mode='rgb_array')", RuntimeWarning, stacklevel=2)
        self.reset()
        if cfg.record_path is not None:
            self.start_recording()

    # ------------------------------------------------------------------ episode
    def reset(self) -> None:
        """Start the dream from a new context clip (the real env, if any, is reset by the clip)."""
        frames, actions = self.context.sample(self.rng, self.cfg.context_frames)
        obs = self.session.reset(np.asarray(frames)[None], np.asarray(actions)[None],
                                 seeds=[int(self.rng.integers(SEED_BOUND))])
        self.frame = obs[0].numpy()
        self.episode += 1
        self.t, self.actions = 0, []
        self.reward = self.total_reward = 0.0
        self.terminated = False
        if self.real is not None:
            self.real.restart()
        self._record_frame()

    def next_action(self) -> int:
        if self.mode == "agent":
            return int(self.policy(self.frame))
        return self.keymap(self.held | self.tapped)

    def step(self, action: int) -> None:
        """One dream step with `action` (and the same action for the real env)."""
        if self.real is not None:  # a real env in a worker steps while the dream does (real_side.py)
            self.real.begin(action, live=self.show_real)
        try:
            t0 = time.perf_counter()
            out = self.session.step(np.array([action], dtype=np.int64))
            self.step_ms = 1000 * (time.perf_counter() - t0)
        finally:
            if self.real is not None:
                self.real.finish()
        self.frame = out.frames[0].numpy()
        self.reward = float(out.rewards[0])
        self.total_reward += self.reward
        self.terminated = bool(out.terminated[0])
        self.t += 1
        self.actions.append(int(action))
        self.tapped.clear()  # the taps were used by this step
        self._record_frame()

    # ------------------------------------------------------------------ per-frame logic
    def handle_events(self, events: Iterable[pygame.event.Event]) -> None:
        for event in events:
            if event.type == pygame.QUIT:
                self.running = False
            elif event.type == pygame.KEYDOWN:
                command = CONTROLS.get(event.key)
                if command is not None:
                    self._command(command)
                else:
                    self.held.add(event.key)
                    self.tapped.add(event.key)
            elif event.type == pygame.KEYUP:
                self.held.discard(event.key)
            elif event.type == pygame.WINDOWFOCUSLOST:
                self.held.clear()  # the key-up events go to another window

    def _command(self, command: str) -> None:
        if command == "quit":
            self.running = False
        elif command == "pause":
            self.paused = not self.paused
        elif command == "step":
            self._step_once = self.paused  # single steps only while paused
        elif command == "agent":
            self.mode = "agent" if self.mode == "human" else "human"
        elif command == "reset":
            self._reset_requested = True
        elif command == "real":
            if self.real is None:
                self.status = NO_REAL
            else:
                self.show_real = not self.show_real
        elif command == "record":
            if self.recorder is None:
                self.start_recording()
            else:
                self.stop_recording()

    def update(self) -> None:
        """At most one dream step: none while paused, except a requested single step."""
        if self._reset_requested:
            self._reset_requested = False
            self.reset()
            return
        if self.show_real and self.real.pending:
            self.real.catch_up()  # shown again: replay what the dream did meanwhile
        if self.paused and not self._step_once:
            return
        self._step_once = False
        self.step(self.next_action())

    def draw(self) -> pygame.Surface:
        """Render the frame(s) and the overlay to the window; returns the window surface."""
        self._frame_times.append(time.perf_counter())
        panels = self._panels(with_real=self.show_real)
        s = self.cfg.scale
        height, width = panels.shape[0] * s, panels.shape[1] * s
        size = (width, height + OVERLAY_ROWS * LINE_HEIGHT + 6)
        screen = self._window(size)
        screen.fill(PANEL_COLOUR)
        # pygame upscales (nearest neighbour, the same pixels as `image`) 5x faster than numpy.
        small = pygame.surfarray.make_surface(panels.transpose(1, 0, 2))  # surfaces are (x, y)
        screen.blit(pygame.transform.scale(small, (width, height)), (0, 0))
        panel = self.frame.shape[1] * self.cfg.scale
        for i, label in enumerate(PANEL_LABELS if self.show_real else PANEL_LABELS[1:]):
            screen.blit(self._font.render(label, True, TEXT_COLOUR), (i * panel + 4, 4))
        rows = self._overlay_rows(width - 8)
        for i, row in enumerate(rows):
            screen.blit(self._font.render(row, True, TEXT_COLOUR), (4, height + 3 + i * LINE_HEIGHT))
        pygame.display.flip()
        return screen

    def _overlay_rows(self, width: int) -> list[str]:
        """The overlay's lines wrapped to `width` px in OVERLAY_ROWS rows: the key help (last line)
        always shows in full at the bottom; the status line gets one row, cut with "..." if long."""
        lines = self.overlay_text()
        help_rows = _wrap(lines.pop(), self._font, width)
        status = [_fit(lines.pop(), self._font, width)] if self.status else []
        rows = [row for line in lines for row in _wrap(line, self._font, width)] + status
        return rows[: max(0, OVERLAY_ROWS - len(help_rows))] + help_rows[:OVERLAY_ROWS]

    def _window(self, size: tuple[int, int]) -> pygame.Surface:
        # pygame has one window per process: take whatever is open (another viewer may have
        # closed or resized it) instead of keeping a surface that could be stale.
        if not pygame.display.get_init():
            pygame.display.init()
        screen = pygame.display.get_surface()
        if screen is None or screen.get_size() != size:
            pygame.display.set_caption("worldsim play")
            screen = pygame.display.set_mode(size)
        if self._font is None:
            self._font = pygame.font.Font(None, LINE_HEIGHT + 2)
        self._drew = True
        return screen

    # ------------------------------------------------------------------ what is shown
    @property
    def fps(self) -> float:
        """Frames drawn per second over the last (up to) 30 frames."""
        if len(self._frame_times) < 2:
            return 0.0
        span = self._frame_times[-1] - self._frame_times[0]
        return (len(self._frame_times) - 1) / span if span > 0 else 0.0

    def overlay_text(self) -> list[str]:
        real = ""
        if self.show_real:
            real = f" | real {self.real.step_ms:.0f} ms, t={self.real.steps}" + (" (ended)" if self.real.done else "")
        flags = [flag for flag, on in (("PAUSED", self.paused), ("TERMINATED (model)", self.terminated)) if on]
        if self.recorder is not None:
            flags.append(f"REC {self.recorder.n_frames}")
        action = self.keymap.action_names[self.actions[-1]] if self.actions else "-"
        return [
            f"{self.fps:.1f} fps | step {self.step_ms:.0f} ms{real}",
            f"{self.mode} | t={self.t} | action {action} | reward {self.reward:+.2f} (sum {self.total_reward:+.2f})"
            + "".join(f" | {f}" for f in flags),
            *([self.status] if self.status else []),
            f"{self.keymap.help} | {CONTROLS_HELP}",
        ]

    def image(self, with_real: bool, labels: bool = False) -> np.ndarray:
        """The real frame if `with_real` (left), then the dream, upscaled: (H s, [2 x] W s, 3) uint8,
        the same layout as `worldsim dream`'s videos. A hidden real side (while recording with it)
        is a grey panel. `labels` writes "real" / "dream" on the panels (recordings; the window
        draws its own with pygame's font)."""
        panels = self._panels(with_real)
        s = self.cfg.scale
        image = np.repeat(np.repeat(panels, s, axis=0), s, axis=1)
        return label_panels(image, PANEL_LABELS[-(2 if with_real else 1):]) if labels else image

    def _panels(self, with_real: bool) -> np.ndarray:
        """`image` before upscaling: (H, [2 x] W, 3) uint8."""
        panels = [self.frame]
        if with_real:
            real = self.real.frame if self.show_real and self.real.frame is not None else None
            panels.insert(0, real if real is not None else np.full_like(self.frame, MISSING_COLOUR))
        return np.concatenate(panels, axis=1)

    # ------------------------------------------------------------------ recording
    def start_recording(self) -> None:
        path = Path(self.cfg.record_path or "worldsim-play.mp4")
        self._takes += 1
        if self._takes > 1:  # never overwrite an earlier take of this session
            path = path.with_name(f"{path.stem}-{self._takes}{path.suffix}")
        fps = self.cfg.record_fps or self.cfg.fps or 4.0
        self.recorder = VideoRecorder(path, fps)
        # The layout is fixed for the whole take (a video keeps one frame size).
        self._record_with_real = self.show_real
        self.status = f"recording to {path}"
        self._record_frame()  # the take starts with the frame on screen

    def stop_recording(self) -> Path | None:
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return None
        path = recorder.close()
        if path is not None:
            self.saved.append(path)
            self.status = f"saved {path} ({recorder.n_frames} frames)"
        return path

    def _record_frame(self) -> None:
        if self.recorder is not None:
            if self._record_with_real and self.show_real and self.real.pending:
                self.real.catch_up()
            self.recorder.add(self.image(with_real=self._record_with_real, labels=True))

    # ------------------------------------------------------------------ loop
    def run(self, max_frames: int | None = None,
            events: Sequence[Iterable[pygame.event.Event]] | None = None) -> int:
        """Loop until quit (Esc / Q / window closed) or `max_frames` frames; returns the frames run.
        `events[i]`: scripted events delivered at frame i, after those in pygame's queue."""
        clock = pygame.time.Clock()
        frames = 0
        while self.running and (max_frames is None or frames < max_frames):
            batch = pygame.event.get()
            if events is not None and frames < len(events):
                batch += list(events[frames])
            self.handle_events(batch)
            if not self.running:
                break
            self.update()
            self.draw()
            frames += 1
            if self.cfg.fps > 0:
                clock.tick(self.cfg.fps)
        return frames

    def close(self) -> list[Path]:
        """Finish any recording and close the window; returns the videos saved this session."""
        self.stop_recording()
        if self._drew and pygame.display.get_init():
            # SDL's "offscreen" driver renders through EGL: quitting it would break a real env
            # that renders in this process (not the way `worldsim play` runs it). It is invisible.
            if pygame.display.get_driver() != "offscreen":
                pygame.display.quit()
        self._drew = False
        return self.saved

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _renders_here(env) -> bool:
    """Whether `env` is a MuJoCo env living in this process (not behind a `SubprocessEnv`)."""
    return not isinstance(getattr(env, "unwrapped", env), SubprocessEnv)


def _fit(line: str, font: pygame.font.Font, width: int) -> str:
    """`line` cut to `width` pixels, ending in "..." when cut."""
    if font.size(line)[0] <= width:
        return line
    while line and font.size(line + "...")[0] > width:
        line = line[:-1]
    return line.rstrip() + "..."


def _wrap(line: str, font: pygame.font.Font, width: int) -> list[str]:
    """Greedy word wrap of one overlay line to `width` pixels."""
    rows: list[str] = []
    for word in line.split(" "):
        if rows and font.size(f"{rows[-1]} {word}")[0] <= width:
            rows[-1] = f"{rows[-1]} {word}"
        else:
            rows.append(word)
    return rows
