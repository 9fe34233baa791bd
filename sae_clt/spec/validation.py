"""`saeclt validate`: every check that needs no activations or training.

Per file: schema (unknown keys, types, choices), id = file name, cross-references (experiment ->
dataset -> subject), hook points (an experiment's are collected by its dataset; a dataset's
exist in its subject's architecture), and params.yaml agreeing with the specs.

No code named by a spec runs unless asked: a torch subject's module paths come from the
hook-point cache (keyed by a hash of the spec and of the factory's module file, read without
importing it), or from building it with ``import_subjects`` (`saeclt validate --import-subjects`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..data.hook_names import is_pattern, matches
from ..errors import DataError, SpecError
from ..io import write_json
from .models import QUOTE_LIMIT, SUBJECT_KINDS, _spec_kind, cap, load_spec, quote, read_yaml
from .project import Paths, find_root, index_problems, resolve_dataset, resolve_experiment

_HOOK_POINTS: dict[tuple, list[str]] = {}  # (root, subject spec) -> hook points: load each model once


class HookPointsUnchecked(Exception):
    """A subject's hook points cannot be listed without importing code the spec names."""


def find_module_file(name: str, folders: list[Path]) -> Path | None:
    """The source file of module ``a.b.c`` in the first of ``folders`` that holds one
    (a/b/c.py or a/b/c/__init__.py), found by path alone: nothing is imported."""
    parts = name.split(".")
    for folder in folders:
        for candidate in (folder.joinpath(*parts[:-1], parts[-1] + ".py"), folder.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


def _search_path(root: Path, python_path: list[str] = ()) -> list[Path]:
    """Where an import would look: the spec's python_path folders, then sys.path's folders."""

    folders = [Path(p) if Path(p).is_absolute() else root / p for p in python_path]
    return folders + [Path(p or ".") for p in sys.path if Path(p or ".").is_dir()]


def _hf_folder(subject_spec, root: Path) -> Path | None:
    """The model folder of an hf subject, located without importing its package (None where
    the package's folder holds no model/config.json, e.g. a package with its own lookup)."""
    if subject_spec.path is not None:
        folder = Path(subject_spec.path)
        return folder if folder.is_absolute() else root / folder
    init = find_module_file(subject_spec.package, _search_path(root))
    if init is None or init.name != "__init__.py" or not (init.parent / "model" / "config.json").is_file():
        return None
    return init.parent / "model"


def _architecture_key(subject_spec, root: Path) -> str | None:
    """A hash of everything a subject's module paths depend on, computed without importing
    torch, transformers or any module the spec names; None where that cannot be known cheaply."""

    h = hashlib.sha256(subject_spec.model_dump_json().encode() + __version__.encode())
    module = SUBJECT_KINDS[subject_spec.kind].module  # sae_clt.subjects.<name>
    h.update((Path(__file__).parents[1].joinpath(*module.split(".")[1:]).with_suffix(".py")).read_bytes())
    try:
        if subject_spec.kind == "hf":
            h.update(metadata.version("transformers").encode())
            folder = _hf_folder(subject_spec, root)
            if folder is None:
                return None
            h.update((folder / "config.json").read_bytes())
        elif subject_spec.kind == "torch":
            found = find_module_file(subject_spec.factory.partition(":")[0], _search_path(root, subject_spec.python_path))
            if found is None:
                return None
            h.update(str(found).encode() + found.read_bytes())
        elif subject_spec.kind == "files":
            for f in subject_spec.files:
                stat = (Path(f) if Path(f).is_absolute() else root / f).stat()
                h.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except (OSError, ValueError, metadata.PackageNotFoundError):
        return None
    return h.hexdigest()[:24]


def _hf_hook_points_from_config(subject_spec, folder: Path) -> list[str]:
    """Module paths of an hf model built from its config.json alone: on the meta device (no
    weights read) and with trust_remote_code=False (a config naming custom code is refused)."""
    try:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SpecError(subject_spec.id, [f"subject '{subject_spec.id}' is a Hugging Face model: install the hf extra "
                                          "(pip install -e '.[hf]' or pip install 'sae_clt[hf]')"]) from None

    hf_logging.disable_progress_bar()
    if not (folder / "config.json").is_file():
        raise DataError(f"subject '{subject_spec.id}': {folder} holds no config.json (expected a Hugging Face model folder)")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = getattr(transformers, subject_spec.auto_class).from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as exc:
        raise SpecError(subject_spec.id, [f"subject '{subject_spec.id}': cannot build the model from {folder / 'config.json'} "
                                          f"with the installed transformers and no custom code: {cap(str(exc), 500)}"]) from None
    from ..data.hooks import module_hook_points  # imports torch: deferred, as every torch-loading import here

    return module_hook_points(model)


def _subject_hook_points(subject_spec, root: Path, import_subjects: bool = True) -> list[str]:
    """The subject's hook points: from the on-disk cache when its architecture is unchanged
    (validate answers without loading torch), else by building the model (and caching).

    Built-in kinds (tsp, files) are built by saeclt's own code; hf models from their
    config.json (no weights, no custom code). A torch subject is built by calling its factory,
    user code, so only with ``import_subjects``; otherwise HookPointsUnchecked is raised."""

    key = (str(root), subject_spec.model_dump_json())
    if key in _HOOK_POINTS:
        return _HOOK_POINTS[key]
    arch = _architecture_key(subject_spec, root)
    cache = root / "runs" / ".cache" / "hook_points" / f"{subject_spec.id}.json"
    if arch is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == arch and isinstance(cached.get("hook_points"), list):
                _HOOK_POINTS[key] = [str(p) for p in cached["hook_points"]]
                return _HOOK_POINTS[key]
        except (ValueError, OSError, AttributeError):
            pass
    folder = _hf_folder(subject_spec, root) if subject_spec.kind == "hf" else None
    if subject_spec.kind == "hf" and folder is not None:
        points = _hf_hook_points_from_config(subject_spec, folder)
    elif subject_spec.kind in ("torch", "hf") and not import_subjects:
        module, _, factory = (subject_spec.factory if subject_spec.kind == "torch" else subject_spec.package).partition(":")
        raise HookPointsUnchecked(
            f"subject '{subject_spec.id}' is {'a torch module' if subject_spec.kind == 'torch' else 'a packaged hf model'}: "
            f"listing its module paths means importing {quote(module)}" + (f" and calling {quote(factory)}" if factory else "")
            + " (code the spec names), which validate does not do")
    else:
        if subject_spec.kind == "hf":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        from ..subjects import subject_architecture

        points = subject_architecture(subject_spec, root).hook_points()
    _HOOK_POINTS[key] = points
    if arch is not None:
        try:
            write_json(cache, {"key": arch, "hook_points": points})
        except OSError:
            pass  # a read-only project still validates, just slower
    return points


def _check_dataset_hooks(path: Path, paths: Paths, import_subjects: bool = True, notes: list[str] | None = None) -> list[str]:
    dataset, subject_spec = resolve_dataset(paths, path.stem)
    try:
        available = _subject_hook_points(subject_spec, paths.root, import_subjects)
    except (SpecError, DataError) as exc:
        return [f"{path}: subject: {exc}"]
    except HookPointsUnchecked as exc:
        if notes is not None:
            notes.append(f"{path}: collect.hook_points not checked: {exc}. To check them (this runs that code): "
                         f"saeclt validate --import-subjects {path} (the result is then cached until the subject spec or "
                         "its module file changes)")
        return []
    _, lines = read_yaml(path)
    problems = []

    for i, point in enumerate(dataset.collect.hook_points):
        if is_pattern(point) and any(matches(a, point) for a in available):
            continue
        if point not in available:
            near = difflib.get_close_matches(point, available, n=3, cutoff=0.5) if len(point) <= QUOTE_LIMIT else []
            line = lines.get(("collect", "hook_points", i), 1)
            problems.append(f"{path}:{line}: collect.hook_points.{i}: subject '{subject_spec.id}' has no hook point {quote(point)}"
                            + (f" (did you mean '{near[0]}'?)" if near else "") + f"; available: {describe_available(point, available)}")
    return problems


def describe_available(point: str, available: list[str], limit: int = 30) -> str:
    """All hook points when there are few; otherwise those nearest the name given."""
    if len(available) <= limit:
        return ", ".join(available)

    near = difflib.get_close_matches(point, available, n=12, cutoff=0.3) if len(point) <= QUOTE_LIMIT else available[:12]
    return f"{', '.join(near)} (the nearest of {len(available)}; module paths as model.named_modules() spells them)"


def validate_files(files: list[Path], check_index: bool = True, import_subjects: bool = True,
                   notes: list[str] | None = None) -> list[str]:
    """Problems found in ``files`` (empty = valid).

    ``import_subjects=False`` (what `saeclt validate` passes unless --import-subjects) runs no
    code the specs name: a torch subject's hook points are then checked only from the cache,
    and a line saying how to check them is appended to ``notes``."""
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
                problems += _check_dataset_hooks(paths.dataset_spec(resolved.dataset.id), paths, import_subjects, notes)
            elif kind == "datasets":
                problems += _check_dataset_hooks(path, paths, import_subjects, notes)
            else:
                load_spec(path, kind)
        except SpecError as exc:
            problems += exc.problems
    for root in sorted(roots) if check_index else []:
        try:
            problems += index_problems(Paths(root))
        except SpecError as exc:
            problems += exc.problems
    if notes is not None:
        notes[:] = list(dict.fromkeys(notes))
    return list(dict.fromkeys(problems))  # a dataset problem reported once, not per experiment


def check_devices(resolved, collect: bool = False) -> None:
    """Refuse a device this machine cannot honour, before any work: the experiment's
    ``train.device`` (where its stages and ``saeclt steer`` run) and, with ``collect``, its
    dataset's ``collect.device``; a SpecError naming file, line and field. (Imports torch.)"""
    from ..devices import resolve_device

    paths = resolved.paths
    checks = [(paths.experiment_spec(resolved.experiment.id), "train", resolved.experiment.train.device)]
    if collect:
        checks.append((paths.dataset_spec(resolved.dataset.id), "collect", resolved.dataset.collect.device))
    for spec_path, section, value in checks:
        try:
            resolve_device(value, f"{section}.device")
        except SpecError as exc:
            line = read_yaml(spec_path)[1].get((section, "device"), 1)
            raise SpecError(str(spec_path), [f"{spec_path}:{line}: {problem}" for problem in exc.problems]) from None
