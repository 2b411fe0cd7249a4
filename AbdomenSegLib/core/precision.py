"""Numerical precision of inference on the CPU: float32, or bfloat16 where the CPU computes it natively.

bf16 halves the network's time on CPUs with bf16 instructions (AVX512-BF16 or AMX: a 2-window UNet call fell
from 1.00 s to 0.46 s on this project's EPYC machines, organ Dice against fp32 >= 0.990) and makes it 40-100x
slower on CPUs without them (torch then emulates it). So bf16 is never assumed: `auto` takes it only where the
CPU reports the instructions and the model's card records a bf16 validation (`inference.bf16_validated`);
`bf16` on a CPU without them is refused. CUDA keeps its own mixed precision (float16 autocast).
"""

from __future__ import annotations

import functools
import platform
from typing import Any, Protocol

from AbdomenSegLib.core.errors import AbdomenSegError

PRECISIONS = ("auto", "fp32", "bf16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class CardLike(Protocol):
    """What this module reads of a model card (models.card.ModelCard, a layer above: not imported here)."""

    def get(self, key: str, default: Any = None, /) -> Any: ...


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU reports bf16 arithmetic instructions (Linux /proc/cpuinfo flags); elsewhere False,
    since there is no cheap, reliable way to tell and the cost of guessing wrong is a 40-100x slowdown."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _BF16_FLAGS)
    except OSError:
        return False
    return False


def resolve_precision(requested: str, device: str, card: CardLike) -> str:
    """'fp32' or 'bf16' for a run on `device` with the model `card`."""
    if requested not in PRECISIONS:
        raise AbdomenSegError(f"unknown precision '{requested}'", f"use one of {', '.join(PRECISIONS)}")
    if device != "cpu" or requested == "fp32":
        return "fp32"  # CUDA: its own float16 autocast
    native = cpu_has_native_bf16()
    if requested == "bf16":
        if not native:
            raise AbdomenSegError(
                "this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), on which bf16 "
                "inference is 40-100x slower",
                "use --precision fp32 or auto",
            )
        return "bf16"
    validated = bool((card.get("inference") or {}).get("bf16_validated"))
    return "bf16" if native and validated else "fp32"
