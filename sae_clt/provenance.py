"""Metadata recorded in every output: what produced it, from which spec, with which seed."""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__


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


def output_meta(spec, seed: int, sections: list[str] | None = None) -> dict:
    """The `meta` block of a metrics or config JSON file."""
    from .spec import spec_hash

    return {"spec_id": spec.id, "spec_hash": spec_hash(spec, sections), "seed": seed, "versions": versions()}
