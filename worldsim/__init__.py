"""worldsim: long-context state-space video world models served as Gymnasium environments."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__: str = _version("worldsim")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
