"""The memory budget: refuse, before anything is allocated, what the device cannot hold.

`require_memory(device, need, what)` raises `MemoryNeedError` (a ValueError and a MemoryError)
stating the bytes `what` would need and the bytes available; `memory_shortfall` gives the same
sentence, or None, for callers that refuse in their own words (a backend's refusal).
Imports no other qkv module.
"""

from __future__ import annotations

import torch

__all__ = ["MemoryNeedError", "SMALL_ALLOCATION", "memory_shortfall", "require_memory", "available_bytes",
           "format_bytes"]


class MemoryNeedError(ValueError, MemoryError):
    """Refused before allocating: the result would need more memory than the device has available.

    Both a ValueError (a request qkv refuses) and a MemoryError (what it is about)."""


#: Below this many bytes nothing asks the system: asking costs more than such an allocation could risk.
SMALL_ALLOCATION = 64 * 2**20


def memory_shortfall(device, need: int, what: str, hint: str = "") -> str | None:
    """Why `need` bytes (for `what`) cannot be allocated on `device`, or None if they can (or it is unknown)."""
    if need <= SMALL_ALLOCATION:
        return None
    device = torch.device(device)
    free = available_bytes(device)
    if free is None or need <= free:
        return None
    return (f"{what} would need {format_bytes(need)} ({need} bytes) and only {format_bytes(free)} is available "
            f"on {device}{hint}")


def require_memory(device, need: int, what: str, hint: str = "") -> None:
    """Raise MemoryNeedError, before anything is allocated, if `need` bytes will not fit on `device`."""
    why = memory_shortfall(device, need, what, hint)
    if why is not None:
        raise MemoryNeedError(why)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation could use on `device`, or None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
