"""``train.precision: auto``: bf16 where the hardware computes it natively, fp32 elsewhere.

bf16 matmuls are only fast on hardware with native bf16 arithmetic (CUDA GPUs that report
support; x86 CPUs with AVX512-BF16 or AMX; Arm CPUs with the bf16 extension). Elsewhere torch
emulates them and they are slower than fp32, so auto falls back to fp32 there. What counts is
the device the training runs on (today the CPU), not whether a GPU is present in the machine. The fast TopK
step keeps fp32 master weights and computes the decoder and loss in fp32 either way; its
held-out FVU in bf16 is within 0.1 % of fp32's on MiniLM (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

NATIVE_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512-BF16, AMX), aarch64 (FEAT_BF16)


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` ("cpu" or "cuda") computes bf16 matmuls natively."""
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.exists():
        return False  # no cheap way to tell: the safe choice
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return bool(NATIVE_BF16_CPU_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """The precision a run on ``device_type`` uses: ``auto`` becomes bf16 where that device
    computes it natively, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device_type) else "fp32"
