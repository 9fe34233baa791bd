"""What several stages share: a log line, and a dataset spec with the subject spec it names."""

from __future__ import annotations

import sys
from pathlib import Path

from ..spec.project import Paths, find_root, resolve_dataset


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dataset_specs(spec_path: Path):
    """(paths, dataset spec, subject spec) of a dataset spec file."""
    paths = Paths(find_root(Path(spec_path).parent))
    dataset, subject_spec = resolve_dataset(paths, Path(spec_path).stem)
    return paths, dataset, subject_spec
