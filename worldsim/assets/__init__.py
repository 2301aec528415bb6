"""Data shipped inside the package, not code: the bundled default world model.

`dream-memory-maze-9x9/` (when present) is a bundle written by `scripts/bundle_model.py`; read it
through `worldsim.bundled`, never by path from here. This file only makes the folder a package so
setuptools' package-data ships it in wheels.
"""
