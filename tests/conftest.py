import os

# Headless rendering on machines without a GPU or a display: MuJoCo through Mesa's software
# EGL, pygame through SDL's dummy driver. Must be set before mujoco / pygame are imported.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


import pytest


@pytest.fixture(autouse=True)
def _no_bundled_model(tmp_path_factory, monkeypatch):
    """Tests see an empty bundle folder unless they opt in, so results never depend on whether a
    bundled model ships in the package (tests that need one build their own)."""
    monkeypatch.setenv("WORLDSIM_BUNDLE_DIR", str(tmp_path_factory.mktemp("no-bundle") / "none"))


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: on a shared 2-core machine it is several times faster
    than two for tiny tensors, and subprocess runs pinned to one thread then agree bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
