"""The only place that knows about CUDA, MPS and CPU differences."""

from __future__ import annotations

import contextlib
import numbers
import sys

from .errors import BadInputError, OutOfMemoryError


def resolve_device(name: str = "auto"):
    """`auto` picks cuda, then mps, then cpu; an explicit name must be available."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise BadInputError(f"unknown device '{name}': use auto, cpu, cuda or mps")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }[name]
    if not available:
        raise BadInputError(f"device '{name}' is not available on this machine: use auto or cpu")
    return torch.device(name)


def autocast(device):
    """bfloat16 autocast on CUDA only; CPU and MPS run float32."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_cpu_threads(threads: int | None) -> None:
    """Limit torch's intra-op CPU threads (None keeps torch's default); torch itself fails obscurely below 1."""
    import torch

    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise BadInputError(f"threads must be a whole number of at least 1, got {threads!r}")
    torch.set_num_threads(int(threads))


def free_cached_memory(device) -> None:
    """Return cached allocator blocks to the system after an out-of-memory error."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """Python, torch (CUDA/MPS) and torch CPU allocation failures; the CPU one is a plain RuntimeError."""
    if isinstance(exc, (MemoryError, OutOfMemoryError)):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
