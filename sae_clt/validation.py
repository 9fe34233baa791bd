"""`saeclt validate`: every check that needs no activations or training.

Per file: schema (unknown keys, types, choices), id = file name, cross-references (experiment ->
dataset -> subject), hook points (an experiment's are collected by its dataset; a dataset's
exist in its subject's architecture), and params.yaml agreeing with the specs.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, SpecError
from .project import Paths, find_root, index_problems, resolve_dataset, resolve_experiment
from .spec import _spec_kind, load_spec, read_yaml

_HOOK_POINTS: dict[tuple, list[str]] = {}  # (root, subject spec) -> hook points: load each model once


def _architecture_key(subject_spec, root: Path) -> str | None:
    """A hash of everything a subject's module paths depend on, computed without importing
    torch or transformers; None where that cannot be known cheaply."""
    import hashlib
    import importlib.util
    import sys
    from importlib import metadata

    from . import __version__

    h = hashlib.sha256(subject_spec.model_dump_json().encode() + __version__.encode())
    source = {"tsp": "tsp.py", "hf": "hf.py", "torch": "torch_module.py", "files": "files.py"}[subject_spec.kind]
    h.update((Path(__file__).parent / "subjects" / source).read_bytes())
    try:
        if subject_spec.kind == "hf":
            h.update(metadata.version("transformers").encode())
            folder = Path(subject_spec.path) if subject_spec.path else None
            if folder is None:
                origin = importlib.util.find_spec(subject_spec.package)
                if origin is None or origin.origin is None:
                    return None
                folder = Path(origin.origin).parent / "model"
            folder = folder if folder.is_absolute() else root / folder
            h.update((folder / "config.json").read_bytes())
        elif subject_spec.kind == "torch":
            extra = [str(Path(p) if Path(p).is_absolute() else root / p) for p in subject_spec.python_path]
            sys.path[:0] = [p for p in extra if p not in sys.path]
            found = importlib.util.find_spec(subject_spec.factory.partition(":")[0])
            if found is None or found.origin is None:
                return None
            h.update(Path(found.origin).read_bytes())
        elif subject_spec.kind == "files":
            for f in subject_spec.files:
                stat = (Path(f) if Path(f).is_absolute() else root / f).stat()
                h.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except (OSError, ImportError, ValueError, metadata.PackageNotFoundError):
        return None
    return h.hexdigest()[:24]


def _subject_hook_points(subject_spec, root: Path) -> list[str]:
    """The subject's hook points: from the on-disk cache when its architecture is unchanged
    (validate answers without loading torch), else by building the model (and caching)."""
    import json

    from .io import write_json

    key = (str(root), subject_spec.model_dump_json())
    if key in _HOOK_POINTS:
        return _HOOK_POINTS[key]
    arch = _architecture_key(subject_spec, root)
    cache = root / "runs" / ".cache" / "hook_points" / f"{subject_spec.id}.json"
    if arch is not None and cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == arch:
                _HOOK_POINTS[key] = cached["hook_points"]
                return _HOOK_POINTS[key]
        except (ValueError, OSError):
            pass
    from .subjects import subject_architecture

    if subject_spec.kind == "hf":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _HOOK_POINTS[key] = subject_architecture(subject_spec, root).hook_points()
    if arch is not None:
        try:
            write_json(cache, {"key": arch, "hook_points": _HOOK_POINTS[key]})
        except OSError:
            pass  # a read-only project still validates, just slower
    return _HOOK_POINTS[key]


def _check_dataset_hooks(path: Path, paths: Paths) -> list[str]:
    dataset, subject_spec = resolve_dataset(paths, path.stem)
    try:
        available = _subject_hook_points(subject_spec, paths.root)
    except (SpecError, DataError) as exc:
        return [f"{path}: subject: {exc}"]
    _, lines = read_yaml(path)
    problems = []
    from .hook_names import is_pattern, matches

    for i, point in enumerate(dataset.collect.hook_points):
        if is_pattern(point) and any(matches(a, point) for a in available):
            continue
        if point not in available:
            import difflib

            near = difflib.get_close_matches(point, available, n=3, cutoff=0.5)
            line = lines.get(("collect", "hook_points", i), 1)
            problems.append(f"{path}:{line}: collect.hook_points.{i}: subject '{subject_spec.id}' has no hook point '{point}'"
                            + (f" (did you mean '{near[0]}'?)" if near else "") + f"; available: {describe_available(point, available)}")
    return problems


def describe_available(point: str, available: list[str], limit: int = 30) -> str:
    """All hook points when there are few; otherwise those nearest the name given."""
    if len(available) <= limit:
        return ", ".join(available)
    import difflib

    near = difflib.get_close_matches(point, available, n=12, cutoff=0.3)
    return f"{', '.join(near)} (the nearest of {len(available)}; module paths as model.named_modules() spells them)"


def validate_files(files: list[Path], check_index: bool = True) -> list[str]:
    problems: list[str] = []
    roots = set()
    for path in files:
        path = Path(path)
        paths = Paths(find_root(path.parent))
        roots.add(paths.root)
        try:
            kind = _spec_kind(path)
            if kind == "experiments":
                resolved = resolve_experiment(path)
                problems += _check_dataset_hooks(paths.dataset_spec(resolved.dataset.id), paths)
            elif kind == "datasets":
                problems += _check_dataset_hooks(path, paths)
            else:
                load_spec(path, kind)
        except SpecError as exc:
            problems += exc.problems
    for root in sorted(roots) if check_index else []:
        try:
            problems += index_problems(Paths(root))
        except SpecError as exc:
            problems += exc.problems
    return list(dict.fromkeys(problems))  # a dataset problem reported once, not per experiment
