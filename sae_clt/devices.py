"""Where a stage's tensors live: the spec's ``device`` setting (``train.device``)
resolved to a ``torch.device`` (collection on a GPU is not built yet).

    auto     cuda when torch sees a GPU, else cpu
    cpu      the CPU (the compiled kernels run only there)
    cuda     a GPU: under torchrun (LOCAL_RANK set) this process's own, cuda:LOCAL_RANK; else cuda:0
    cuda:N   GPU N

A setting the machine cannot honour (no GPU, N out of range) is refused as a spec error naming
the field, before any work starts.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import SpecError
from .spec.models import DEVICE_PATTERN


def resolve_device(setting: str, field: str) -> torch.device:
    """The device ``setting`` names on this machine; ``field`` (e.g. ``train.device``) is named in
    the error when it cannot be honoured."""
    match = re.match(DEVICE_PATTERN, setting)
    if match is None:
        raise SpecError(field, [f"{field}: {setting!r} is not a device; allowed: auto, cpu, cuda, cuda:N"])
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SpecError(field, [f"{field}: {setting!r} but torch sees no CUDA device on this machine "
                                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use cpu or auto"])
    count = torch.cuda.device_count()
    if match.group(2):
        index = int(match.group(2)[1:])
    else:  # cuda or auto: torchrun gives each process its own GPU
        index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= count:
        where = "" if match.group(2) else f" (LOCAL_RANK {index})"
        raise SpecError(field, [f"{field}: {setting!r}{where} asks for GPU {index} but this machine has {count} "
                                f"(cuda:0 to cuda:{count - 1})"])
    return torch.device("cuda", index)
