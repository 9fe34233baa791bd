"""Metadata recorded in every output: what produced it, from which spec, with which seed."""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib import metadata
from pathlib import Path

from . import __version__
from .devices import describe
from .spec.models import spec_hash


def versions() -> dict[str, str]:
    import torch

    return {
        "saeclt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "safetensors": _version("safetensors"),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def output_meta(spec, seed: int, sections: list[str] | None = None, device=None) -> dict:
    """The `meta` block of a metrics or config JSON file; ``device``: where the output was made
    (recorded as ``devices.describe`` writes it)."""
    meta = {"spec_id": spec.id, "spec_hash": spec_hash(spec, sections), "seed": seed, "versions": versions()}
    if device is not None:
        meta["device"] = describe(device)
    return meta


@functools.cache
def code_digest() -> str:
    """A hash of the package's own source files (Python, C++, templates): state saved by one
    version of the code (a training checkpoint) is resumed only by the same code."""
    h = hashlib.sha256(__version__.encode())
    root = Path(__file__).parent
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h", ".j2") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
