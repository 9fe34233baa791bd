"""Where things live in a saeclt project, and the spec index in params.yaml.

A project is a folder with ``specs/`` (and, once set up, ``params.yaml``, ``dvc.yaml``). Every
path below is relative to its root so DVC stages and ``saeclt run`` agree. The index in
``params.yaml`` drives ``dvc.yaml``'s ``foreach`` stages; it is derived from the specs and
checked against them, never edited by hand into disagreement.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.hook_names import matches
from ..errors import SpecError
from ..io import atomic_write_text
from .models import SUBJECT_KINDS, DatasetSpec, ExperimentSpec, SubjectSpec, load_spec, read_yaml


def find_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder at or above ``start`` holding ``specs/``."""
    here = (start or Path.cwd()).resolve()
    for folder in [here, *here.parents]:
        if (folder / "specs").is_dir():
            return folder
    return Path.cwd().resolve()


EVAL_TENSORS = "eval.safetensors"  # in an experiment's eval folder


@dataclass(frozen=True)
class Paths:
    """Every on-disk location of the pipeline, relative to ``root``."""

    root: Path

    def subject_spec(self, sid: str) -> Path:
        return self.root / "specs" / "subjects" / f"{sid}.yaml"

    def dataset_spec(self, did: str) -> Path:
        return self.root / "specs" / "datasets" / f"{did}.yaml"

    def experiment_spec(self, eid: str) -> Path:
        return self.root / "specs" / f"{eid}.yaml"

    def subject_dir(self, sid: str) -> Path:
        return self.root / "runs" / "subjects" / sid

    def subject_metrics(self, sid: str) -> Path:
        return self.root / "metrics" / "subjects" / f"{sid}.json"

    def store_dir(self, did: str) -> Path:
        """Raw activation store, or a pointer to it (``location.json``) when it was collected
        under $ACTIVATIONS_ROOT; ActivationStore.open follows the pointer."""
        return self.root / "runs" / "datasets" / did / "store"

    def external_store_dir(self, did: str) -> Path | None:
        """Where collect writes the store when $ACTIVATIONS_ROOT is set (a larger disk)."""
        base = os.environ.get("ACTIVATIONS_ROOT")
        return Path(base).expanduser().resolve() / did if base else None

    def norm_dir(self, did: str) -> Path:
        return self.root / "runs" / "datasets" / did / "normalize"

    def dataset_metrics(self, did: str) -> Path:
        return self.root / "metrics" / "datasets" / f"{did}.json"

    def dictionary_dir(self, eid: str) -> Path:
        return self.root / "runs" / "experiments" / eid / "dictionary"

    def checkpoint_dir(self, eid: str) -> Path:
        """Resumable training state: beside the dictionary, not a DVC output (DVC clears those)."""
        return self.root / "runs" / "experiments" / eid / "checkpoint"

    def curves_dir(self, eid: str) -> Path:
        return self.root / "metrics" / eid / "curves"

    def eval_dir(self, eid: str) -> Path:
        return self.root / "runs" / "experiments" / eid / "eval"

    def eval_tensors(self, eid: str) -> Path:
        """Per-latent density and top rows of the validation split (read by report and export)."""
        return self.eval_dir(eid) / EVAL_TENSORS

    def eval_metrics(self, eid: str) -> Path:
        return self.root / "metrics" / eid / "eval.json"

    def train_metrics(self, eid: str) -> Path:
        return self.root / "metrics" / eid / "train.json"

    def analysis_dir(self, eid: str) -> Path:
        return self.root / "runs" / "experiments" / eid / "analysis"

    def analysis_metrics(self, eid: str) -> Path:
        return self.root / "metrics" / eid / "analysis.json"

    def dashboard_dir(self, eid: str) -> Path:
        return self.report_dir(eid) / "features"

    def report_dir(self, eid: str) -> Path:
        return self.root / "reports" / eid

    def export_dir(self, eid: str) -> Path:
        return self.root / "runs" / "experiments" / eid / "export"


@dataclass(frozen=True)
class Resolved:
    """An experiment spec with the dataset and subject specs it names."""

    experiment: ExperimentSpec
    dataset: DatasetSpec
    subject: SubjectSpec
    paths: Paths


def resolve_dataset(paths: Paths, dataset_id: str, named_in: Path | None = None) -> tuple[DatasetSpec, SubjectSpec]:
    dpath = paths.dataset_spec(dataset_id)
    if not dpath.exists():
        where = f"{named_in}:{read_yaml(named_in)[1].get(('dataset',), 1)}: dataset" if named_in else "dataset"
        raise SpecError(str(named_in or dpath), [f"{where}: no dataset spec '{dataset_id}' (expected {dpath.relative_to(paths.root)})"])
    dataset = load_spec(dpath, "datasets")
    spath = paths.subject_spec(dataset.subject)
    if not spath.exists():
        line = read_yaml(dpath)[1].get(("subject",), 1)
        raise SpecError(str(dpath), [f"{dpath}:{line}: subject: no subject spec '{dataset.subject}' (expected {spath.relative_to(paths.root)})"])
    return dataset, load_spec(spath, "subjects")


def _as_list(point: str | list[str]) -> list[str]:
    return [point] if isinstance(point, str) else list(point)


def resolve_experiment(spec_path: str | Path) -> Resolved:
    """Load an experiment spec and everything it names; cross-check hook points."""
    spec_path = Path(spec_path)
    paths = Paths(find_root(spec_path.parent))
    experiment = load_spec(spec_path, "experiments")
    dataset, subject = resolve_dataset(paths, experiment.dataset, spec_path)
    collected = dataset.collect.hook_points

    for field, point in [(f, p) for f in ("source", "target") for p in _as_list(getattr(experiment, f))]:
        if not any(matches(point, pattern) for pattern in collected):
            line = read_yaml(spec_path)[1].get((field,), 1)
            raise SpecError(
                str(spec_path),
                [
                    f"{spec_path}:{line}: {field}: hook point '{point}' is not collected by dataset '{dataset.id}'; "
                    f"collected: {', '.join(collected)} (add it to {paths.dataset_spec(dataset.id).relative_to(paths.root)} collect.hook_points)"
                ],
            )
    return Resolved(experiment, dataset, subject, paths)


# --------------------------------------------------------------------------- params.yaml index


INDEX_GROUPS = ("subjects", "loaded_subjects", "datasets", "experiments")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def build_index(paths: Paths, experiment_ids: list[str], previous: dict | None = None) -> dict:
    """The params.yaml index for these experiments, derived from their specs (sorted).

    An experiment whose spec file no longer exists is dropped, with a warning. Given
    ``previous`` (the index params.yaml holds now), an experiment listed there whose specs no
    longer load keeps its previous entry, with a warning: one broken spec does not stop the
    others from running (`saeclt validate` names its problems)."""
    index: dict = {group: {} for group in INDEX_GROUPS}
    for eid in sorted(set(experiment_ids)):
        spec_path = paths.experiment_spec(eid)
        if not spec_path.exists():
            _warn(f"params.yaml: experiment '{eid}' dropped from the index: its spec "
                  f"{spec_path.relative_to(paths.root)} no longer exists")
            continue
        try:
            exp = load_spec(spec_path, "experiments")
            dataset, subject = resolve_dataset(paths, exp.dataset, spec_path)
        except SpecError as exc:
            if previous is None or eid not in previous["experiments"]:
                raise
            _keep_entry(index, previous, eid)
            first = exc.problems[0] if exc.problems else str(exc)
            _warn(f"params.yaml: experiment '{eid}' keeps its previous index entry: {first}")
            continue
        index["experiments"][exp.id] = {"dataset": dataset.id, "subject": subject.id}
        index["datasets"][dataset.id] = {"subject": subject.id}
        # Trained subjects run when their spec changes; loaded ones (models, files) are
        # fingerprinted on every run so swapped weights or files are noticed.
        group = "subjects" if SUBJECT_KINDS[subject.kind].trained else "loaded_subjects"
        index[group][subject.id] = {"kind": subject.kind}
    return index


def _keep_entry(index: dict, previous: dict, eid: str) -> None:
    entry = previous["experiments"][eid]
    index["experiments"][eid] = entry
    if isinstance(entry, dict):
        if entry.get("dataset") in previous["datasets"]:
            index["datasets"].setdefault(entry["dataset"], previous["datasets"][entry["dataset"]])
        for group in ("subjects", "loaded_subjects"):
            if entry.get("subject") in previous[group]:
                index[group].setdefault(entry["subject"], previous[group][entry["subject"]])


def read_index(paths: Paths) -> dict:
    path = paths.root / "params.yaml"
    if not path.exists():
        return {group: {} for group in INDEX_GROUPS}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"{path}: not readable YAML ({str(exc).splitlines()[0]}); rewrite it from the specs "
                                    "with `saeclt index specs/EXPERIMENT.yaml ...`"]) from None
    groups = {k: (data.get(k) if isinstance(data, dict) else None) or {} for k in INDEX_GROUPS}
    bad = [k for k, v in groups.items() if not isinstance(v, dict)]
    if not isinstance(data, dict) or bad:
        raise SpecError(str(path), [f"{path}: {'`' + bad[0] + '`' if bad else 'the file'} is not a mapping; rewrite it from "
                                    "the specs with `saeclt index specs/EXPERIMENT.yaml ...`"])
    return {k: dict(v) for k, v in groups.items()}


def index_problems(paths: Paths) -> list[str]:
    """Disagreements between params.yaml and the specs it lists."""
    problems = []
    current = read_index(paths)
    for eid, entry in current["experiments"].items():
        spec_path = paths.experiment_spec(eid)
        if not spec_path.exists():
            problems.append(f"params.yaml: experiments.{eid}: no spec file {spec_path.relative_to(paths.root)} "
                            "(`saeclt index` drops it; `saeclt run` does too)")
            continue
        exp = load_spec(spec_path, "experiments")
        dataset, subject = resolve_dataset(paths, exp.dataset, spec_path)
        want = {"dataset": dataset.id, "subject": subject.id}
        if entry != want:
            problems.append(f"params.yaml: experiments.{eid}: says {entry}, the specs say {want} (run `saeclt index`)")
    return problems


INDEX_HEADER = (
    "# The experiments `dvc repro` runs, and the dataset and subject each one uses.\n"
    "# Written by `saeclt index` / `saeclt run` from the specs; `saeclt validate` checks it.\n"
)


def write_index(paths: Paths, experiment_ids: list[str], previous: dict | None = None) -> dict:
    index = build_index(paths, experiment_ids, previous)
    atomic_write_text(paths.root / "params.yaml", INDEX_HEADER + yaml.safe_dump(index, sort_keys=True))
    return index
