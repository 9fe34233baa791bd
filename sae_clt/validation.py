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


def _subject_hook_points(subject_spec, root: Path) -> list[str]:
    from .subjects import subject_architecture

    key = (str(root), subject_spec.model_dump_json())
    if key not in _HOOK_POINTS:
        if subject_spec.kind == "hf":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        _HOOK_POINTS[key] = subject_architecture(subject_spec, root).hook_points()
    return _HOOK_POINTS[key]


def _check_dataset_hooks(path: Path, paths: Paths) -> list[str]:
    dataset, subject_spec = resolve_dataset(paths, path.stem)
    try:
        available = _subject_hook_points(subject_spec, paths.root)
    except (SpecError, DataError) as exc:
        return [f"{path}: subject: {exc}"]
    _, lines = read_yaml(path)
    problems = []
    from .hooks import is_pattern, matches

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
