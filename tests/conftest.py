import os

# Headless rendering on machines without a GPU or a display: MuJoCo through Mesa's software
# EGL, pygame through SDL's dummy driver. Must be set before mujoco / pygame are imported.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
