"""What this CPU offers that decides which code path is the faster one."""

from __future__ import annotations

import functools


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (Linux lists the flag in /proc/cpuinfo). With them,
    bfloat16 matmuls and convolutions run several times faster than float32; without them oneDNN
    emulates bfloat16 and it is slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False
