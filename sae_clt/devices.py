"""Where a stage's tensors live: the spec's ``device`` settings resolved to a ``torch.device``.

``train.device`` (an experiment's train, evaluate, analyze and steer) and ``collect.device`` (a
dataset's subject during collection) take:
    auto     cuda when torch sees a GPU, else cpu
    cpu      the CPU (the compiled kernels run only there)
    cuda     a GPU: under torchrun (LOCAL_RANK set) this process's own, cuda:LOCAL_RANK; else cuda:0
    cuda:N   GPU N

``$SAECLT_DEVICE`` (cpu, cuda, cuda:N), when set, is what ``auto`` means: e.g. ``cpu`` keeps every
spec on the CPU of a GPU machine (the test suite sets it, so that its reference figures are the
CPU's everywhere). A setting the machine cannot honour (no GPU, N out of range) is refused as a
spec error naming the field, before any work starts. Every output records where it was made (``meta.device``);
what it holds does not depend on it (tensors are saved from the CPU, metrics are plain numbers).
"""

from __future__ import annotations

import os
import re

import torch

from .errors import SpecError
from .spec.models import DEVICE_PATTERN

AUTO_ENV = "SAECLT_DEVICE"  # when set (cpu, cuda, cuda:N), what `auto` means on this machine


def resolve_device(setting: str, field: str) -> torch.device:
    """The device ``setting`` names on this machine; ``field`` (e.g. ``train.device``) is named in
    the error when it cannot be honoured."""
    match = re.match(DEVICE_PATTERN, setting)
    if match is None:
        raise SpecError(field, [f"{field}: {setting!r} is not a device; allowed: auto, cpu, cuda, cuda:N"])
    if setting == "auto" and os.environ.get(AUTO_ENV, "auto") != "auto":  # the machine's own choice for every `auto`
        return resolve_device(os.environ[AUTO_ENV], f"{field} (auto, from ${AUTO_ENV})")
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


def experiment_device(exp) -> torch.device:
    """Where an experiment's stages run (train, evaluate, analyze, steer): its ``train.device``."""
    return resolve_device(exp.train.device, "train.device")


def describe(device: torch.device | str) -> str:
    """The device as outputs record it: ``cpu``, or ``cuda:N (card name)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def move(value, device: torch.device):
    """``value`` with every tensor in it (in dicts, lists and tuples too) on ``device``; tensors
    already there are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move(v, device) for v in value)
    return value


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """``train.deterministic``: on a GPU, only deterministic algorithms (torch refuses an operation
    that has none, naming it) and cuBLAS with a fixed workspace, so that the same spec and seed,
    and a run resumed from a checkpoint, give the same bits. The CPU steps are deterministic
    either way. Applies to this process from here on."""
    if not deterministic or torch.device(device).type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
