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


PRECISIONS = ("auto", "fp32", "bf16", "int8")


def resolve_precision(name: str, device) -> str:
    """The arithmetic a model runs in on this device: fp32, bf16 (autocast) or int8 (CPU image-encoder linears).

    `auto` picks only what benchmarks/bench_precision.py showed accurate and faster: bf16 on CUDA (as MedSAM2
    itself runs) and on CPUs with bfloat16 instructions (AVX512-BF16 or AMX); fp32 elsewhere (MPS, older CPUs).
    """
    name = str(name or "auto").lower()
    if name not in PRECISIONS:
        raise BadInputError(f"unknown precision '{name}': use {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"
    if name == "int8" and device.type != "cpu":
        raise BadInputError(f"precision int8 runs on the CPU only, not on {device.type}: choose the cpu device or bf16")
    return name


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively; without it bf16 is emulated and slower than fp32."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def autocast(device, precision: str):
    """bfloat16 autocast for the bf16 precision; fp32 and int8 run as the weights are."""
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
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
