"""Import the legacy `gym` package without its import-time notice.

memory-maze and crafter import `gym` (0.26) unconditionally, although worldsim only speaks
Gymnasium. `gym` prints a multi-line "gym is unmaintained" notice to stderr the first time it is
imported; for our users it is noise about a package they never call, so we import it once here
with stderr captured. Nothing else is swallowed: import errors still propagate.
"""

from __future__ import annotations

import contextlib
import io
import sys


def import_legacy_gym_quietly() -> None:
    """Import `gym` (if not imported yet) with its stderr notice suppressed."""
    if "gym" in sys.modules:
        return
    with contextlib.redirect_stderr(io.StringIO()):
        import gym  # noqa: F401
