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
