"""Run an object (an env, a window) in a worker process of its own, and talk to it over a pipe.

Why: an OpenGL context and a process do not mix freely. MuJoCo (Memory Maze) renders through EGL,
pygame's window through GLX (X11) or EGL (SDL's "offscreen" driver); in one process they break
each other: `X_GLXMakeCurrent BadAccess` under an X server, corrupted MuJoCo frames or
`EGL_BAD_CONTEXT` without one. Keeping each GL context in its own process avoids all of that.

    env = SubprocessEnv(MemoryMazeEnv, size=9, render_mode="rgb_array")   # or an env id
    obs, info = env.reset(seed=0)        # runs in the worker; frames come back as arrays
    env.close()                          # stops the worker; closing again does nothing

`Worker` is the plumbing (any object, method calls by name); `SubprocessEnv` is a
`gymnasium.Env` proxy on top of it. The worker is a fresh Python interpreter
(`python -c ...`, not `multiprocessing`'s fork or spawn): nothing of the parent's state leaks in,
and scripts that build an env at the top level without an `if __name__ == "__main__":` guard
still work (spawn would re-run them in the child; spawn is the fallback only where file
descriptors cannot be passed, i.e. Windows). What is sent must pickle; the factory must be
importable by name (a class or module-level function, or a registered env id).

Lifetime: the worker ignores Ctrl+C (the parent decides when it stops) and exits by itself when
the parent goes away (its end of the pipe closes). If the worker dies, the next call raises
`WorkerError` with its exit status; its own traceback, if any, is on stderr.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

import gymnasium as gym

IDLE_PERIOD_S = 0.05  # how often a waiting worker calls its target's `worker_idle()`
CLOSE_TIMEOUT_S = 10.0
# The worker's interpreter gets the parent's sys.path (also folders added at run time, such as a
# test folder), in the same order, before it imports anything of ours.
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
         "from worldsim.envs.subprocess_env import _serve_fd; _serve_fd(int(sys.argv[1]))")


class WorkerError(RuntimeError):
    """The worker process is gone (it crashed, was killed, or was closed)."""


# ------------------------------------------------------------------------------ the worker side
def _serve_fd(fd: int) -> None:
    _serve(Connection(fd))


def _serve(conn: Connection) -> None:
    """The worker's loop: build the target, then answer requests until "close" or end of pipe.

    Requests: ("call", name, args, kwargs) -> ("ok", result) or ("error", packed exception);
    ("get", name) -> the attribute; ("close",) -> calls target.close() if it has one, answers, exits.
    A target with a `worker_idle()` method has it called every IDLE_PERIOD_S while no request waits
    (a window uses it to keep handling its events).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group
    try:
        message = conn.recv_bytes()
    except EOFError:
        return
    try:
        factory, args, kwargs = pickle.loads(message)  # the factory may not import here: report it
        target = factory(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 (every failure goes back to the parent)
        _send(conn, ("error", _pack_exception(e)))
        return
    _send(conn, ("ok", None))
    idle = getattr(target, "worker_idle", None)
    while True:
        try:
            if idle is not None:
                while not conn.poll(IDLE_PERIOD_S):
                    idle()
            request = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        op = request[0]
        try:
            if op == "close":
                close = getattr(target, "close", None)
                if close is not None:
                    close()
                reply = ("ok", None)
            elif op == "call":
                _, name, args, kwargs = request
                reply = ("ok", getattr(target, name)(*args, **kwargs))
            elif op == "get":
                reply = ("ok", getattr(target, request[1]))
            else:
                raise ValueError(f"unknown worker request {op!r}")
        except BaseException as e:  # noqa: BLE001
            reply = ("error", _pack_exception(e))
        if not _send(conn, reply) or op == "close":
            break
    conn.close()


def _send(conn: Connection, reply: tuple) -> bool:
    """Send a reply; a result that does not pickle becomes an error reply. False: parent gone."""
    try:
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # pickling fails before writing
            conn.send(("error", _pack_exception(e)))
        return True
    except OSError:
        return False


def _pack_exception(e: BaseException) -> tuple[bytes | None, str, str]:
    """(the pickled exception or None, "Type: message", the worker's traceback)."""
    text = "".join(traceback.format_exception(e))
    try:
        data = pickle.dumps(e)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
    except Exception:  # noqa: BLE001
        data = None
    return data, f"{type(e).__name__}: {e}", text


def _unpack_exception(packed: tuple[bytes | None, str, str]) -> BaseException:
    data, summary, text = packed
    try:
        e = pickle.loads(data) if data is not None else None
    except Exception:  # noqa: BLE001 (e.g. its class cannot be imported here)
        e = None
    if e is None:
        e = RuntimeError(f"in the worker process: {summary}")
    e.add_note("raised in the worker process:\n" + text.rstrip())
    return e


# ------------------------------------------------------------------------------ the parent side
class Worker:
    """`factory(*args, **kwargs)` built and kept in a new Python process; `call` runs its methods.

    Exceptions raised there are raised here again (same type when it pickles, with the worker's
    traceback as a note). If the process dies, calls raise `WorkerError`. `close()` asks the
    object to close, waits for the process to exit (killing it after `timeout`), and can be
    called any number of times.
    """

    def __init__(self, factory: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any) -> None:
        self.name = name or getattr(factory, "__name__", "worker")
        self._conn: Connection | None = None
        self._proc = None
        self._in_flight: str | None = None  # the method of a `call_async` whose answer is not collected
        self._conn, self._proc = _start_process()
        self.pid: int = self._proc.pid
        try:
            self._request((factory, args, kwargs), what="start")
        except BaseException:
            self._shutdown(timeout=CLOSE_TIMEOUT_S)
            raise

    @property
    def closed(self) -> bool:
        return self._conn is None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._request(("call", method, args, kwargs), what=method)

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send `call(method, ...)` and return at once: the worker runs it meanwhile (in its own
        process, so on another core while this one works); `result()` waits for its answer. One
        call at a time: any other request before `result()` raises."""
        self._send(("call", method, args, kwargs), what=method)
        self._in_flight = method

    def result(self) -> Any:
        """The answer to the pending `call_async` (its exception raised here)."""
        if self._in_flight is None or self._conn is None:
            raise RuntimeError(f"no call to the {self.name} worker is in flight")
        what, self._in_flight = self._in_flight, None
        return self._receive(what)

    def get(self, attribute: str) -> Any:
        return self._request(("get", attribute), what=attribute)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close the object and end the process. Errors of a worker already dead are not raised."""
        if self._conn is None:
            return
        try:
            if self._in_flight is not None:  # its answer comes first: take it, whatever it is
                try:
                    self.result()
                except Exception:  # noqa: BLE001 (closing anyway; a dead worker raises below)
                    pass
            self._request(("close",), what="close")
        except WorkerError:
            pass
        finally:
            self._shutdown(timeout)

    def __del__(self) -> None:
        # Dropped without close(): closing our end of the pipe makes the worker exit on its own.
        conn = getattr(self, "_conn", None)
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pid {self.pid}"
        return f"<Worker {self.name} ({state})>"

    # ---------------------------------------------------------------- internals
    def _request(self, message: tuple, what: str) -> Any:
        self._send(message, what)
        return self._receive(what)

    def _send(self, message: tuple, what: str) -> None:
        if self._conn is None:
            raise WorkerError(f"the {self.name} worker process has been closed")
        if self._in_flight is not None:
            raise RuntimeError(f"{what!r} asked of the {self.name} worker while {self._in_flight!r} is in "
                               "flight: collect that with result() first")
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # fails before anything is sent
        try:
            self._conn.send_bytes(payload)
        except OSError:
            raise self._died(what) from None

    def _receive(self, what: str) -> Any:
        try:
            while not self._conn.poll(0.5):  # the pipe also ends when the process dies; this
                if _exit_status(self._proc) is not None:  # covers an inherited, still open pipe
                    raise EOFError
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._died(what) from None
        except BaseException:
            # Interrupted (Ctrl+C) while the worker works: its reply would come out of turn and
            # the object is half-way through a call. Nothing can be trusted any more: stop it.
            self._shutdown(timeout=1.0)
            raise
        if status == "error":
            raise _unpack_exception(value)
        return value

    def _died(self, what: str) -> WorkerError:
        code = _wait(self._proc, 5.0)
        self._close_conn()
        if code is None:
            how = "stopped answering"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        request = "while starting" if what == "start" else f"during {what!r}"
        return WorkerError(f"the {self.name} worker process (pid {self.pid}) {how} {request}; "
                           "its error output, if any, is above")

    def _shutdown(self, timeout: float) -> None:
        self._close_conn()
        if _wait(self._proc, timeout) is None:
            self._proc.kill()
            _wait(self._proc, 5.0)

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _start_process():
    """(our end of the pipe, the process) of a fresh interpreter running `_serve`."""
    if os.name != "posix":  # no fd passing: multiprocessing's spawn (a fresh interpreter too)
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(theirs,), daemon=True)
        proc.start()
        theirs.close()
        return ours, proc
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(theirs.fileno()), json.dumps(sys.path)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=sys.__stderr__.fileno() if _has_fileno(sys.__stderr__) else subprocess.DEVNULL,
        )  # the worker's prints go to stderr: our stdout may carry data
    finally:
        theirs.close()  # only the worker holds that end now: its death ends the pipe
    return Connection(ours.detach()), proc


def _has_fileno(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _exit_status(proc) -> int | None:
    return proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode


def _wait(proc, timeout: float) -> int | None:
    if isinstance(proc, subprocess.Popen):
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    proc.join(timeout)
    return proc.exitcode


# ------------------------------------------------------------------------------ the env proxy
class _EnvHost:
    """What the worker of a `SubprocessEnv` holds: the env, plus replies that save round trips."""

    def __init__(self, make_env: str | Callable[..., gym.Env], args: tuple, kwargs: dict) -> None:
        if isinstance(make_env, str):
            import worldsim.envs  # noqa: F401 (registers the worldsim/ ids)

            self.env = gym.make(make_env, *args, **kwargs)
        else:
            self.env = make_env(*args, **kwargs)

    def describe(self) -> dict[str, Any]:
        env = self.env
        try:
            spec = pickle.loads(pickle.dumps(env.spec))
        except Exception:  # noqa: BLE001 (a spec with an unpicklable entry point)
            spec = None
        return {"observation_space": env.observation_space, "action_space": env.action_space,
                "metadata": dict(env.metadata), "render_mode": env.render_mode, "spec": spec,
                "name": type(env.unwrapped).__name__}

    def reset(self, seed, options):
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, info, self.env.np_random_seed

    def step(self, action):
        return self.env.step(action)

    def render(self):
        return self.env.render()

    def close(self) -> None:
        self.env.close()

    def get(self, name: str) -> Any:
        return getattr(self.env, name)

    def get_unwrapped(self, name: str) -> Any:
        return getattr(self.env.unwrapped, name)

    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.env, name)(*args, **kwargs)

    def np_random_seed(self) -> int:
        return self.env.np_random_seed


class SubprocessEnv(gym.Env):
    """A `gymnasium.Env` whose env lives in a worker process (see the module doc).

    `make_env`: a registered env id (made there with `gymnasium.make(make_env, *args, **kwargs)`)
    or an importable callable returning an env (`make_env(*args, **kwargs)`, e.g. a class).
    Spaces, `metadata`, `render_mode` and `spec` are copied from the env; `reset`, `step`,
    `render` and `close` are forwarded; `np_random_seed` is the env's. Other attributes:
    `get_attr(name)` (`unwrapped=True` reads past wrappers) and `call(name, *args, **kwargs)`.
    Seeding happens in the worker: this proxy's own `np_random` is not the env's.
    """

    def __init__(self, make_env: str | Callable[..., gym.Env], *args: Any, **kwargs: Any) -> None:
        name = make_env if isinstance(make_env, str) else getattr(make_env, "__name__", "env")
        self._worker = Worker(_EnvHost, make_env, args, kwargs, name=str(name))
        try:
            desc = self._worker.call("describe")
        except BaseException:
            self._worker.close()
            raise
        self.observation_space = desc["observation_space"]
        self.action_space = desc["action_space"]
        self.metadata = desc["metadata"]
        self.render_mode = desc["render_mode"]
        self.spec = desc["spec"]
        self.env_name = desc["name"]
        self._env_seed: int | None = None

    @property
    def worker(self) -> Worker:
        return self._worker

    @property
    def closed(self) -> bool:
        return self._worker.closed

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info, self._env_seed = self._worker.call("reset", seed, options)
        return obs, info

    def step(self, action):
        return self._worker.call("step", action)

    def step_async(self, action) -> None:
        """Start `step(action)` in the worker and return at once; `step_wait()` returns its result.
        The worker steps while this process does other work (the viewer dreams meanwhile)."""
        self._worker.call_async("step", action)

    def step_wait(self):
        """The result of the step started by `step_async`."""
        return self._worker.result()

    def render(self):
        return self._worker.call("render")

    def close(self) -> None:
        self._worker.close()

    @property
    def np_random_seed(self) -> int:
        """The env's seed (from its last `reset`; -1 if it was seeded from entropy)."""
        if self._env_seed is None:
            self._env_seed = self._worker.call("np_random_seed")
        return self._env_seed

    def get_attr(self, name: str, unwrapped: bool = False) -> Any:
        """An attribute of the env (of `env.unwrapped` with `unwrapped=True`), copied here."""
        return self._worker.call("get_unwrapped" if unwrapped else "get", name)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The result of `env.<name>(*args, **kwargs)`, run in the worker."""
        return self._worker.call("call", name, args, kwargs)

    def __repr__(self) -> str:
        return f"<SubprocessEnv {self.env_name} ({'closed' if self.closed else f'pid {self._worker.pid}'})>"

    __str__ = __repr__
