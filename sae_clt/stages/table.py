"""The stage table: every pipeline stage in one place.

Each row says which spec a stage runs on, which sections of it the stage reads (its DVC
parameters), the data it reads and writes, and the module whose ``run(spec_path)`` does the
work. From this table come dvc.yaml (``saeclt dvc-yaml``, with each stage's code dependencies
computed as its module's import closure), ``saeclt stage NAME SPEC``, the targets of
``saeclt run``, and the sections a spec must write out (``tracked_sections``).

Paths may use DVC's ``foreach`` variables: ``${key}`` (the spec's id) and ``${item.dataset}`` /
``${item.subject}`` (what params.yaml records for it).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, SpecError


@dataclass(frozen=True)
class Out:
    """An output of a stage. ``cache=False``: DVC tracks it without a second copy in its cache;
    ``persist=True``: DVC leaves it in place before the stage runs (for resumable work)."""

    path: str
    cache: bool = True
    persist: bool = False


@dataclass(frozen=True)
class Stage:
    name: str  # DVC stage name, and NAME in `saeclt stage NAME SPEC`
    spec_kind: str  # "subjects" | "datasets" | "experiments": the spec it runs on
    foreach: str  # the params.yaml group it runs for, one instance per entry
    module: str  # the module whose run(spec_path) does the work
    sections: tuple[str, ...] | None  # spec sections it reads; None: the whole file
    deps: tuple[str, ...] = ()  # data it reads (code dependencies are computed)
    outs: tuple[Out, ...] = ()
    metrics: tuple[str, ...] = ()  # JSON metrics, tracked by git (not cached)
    plots: tuple[str, ...] = ()  # folders of TSV curves (x: step)
    always_changed: bool = False  # run on every repro (cheap fingerprints of things saeclt does not own)
    about: str = ""  # a comment for dvc.yaml

    @property
    def command(self) -> str:
        return self.module.rsplit(".", 1)[1]

    def spec_path(self) -> str:
        return {"subjects": "specs/subjects/${key}.yaml", "datasets": "specs/datasets/${key}.yaml",
                "experiments": "specs/${key}.yaml"}[self.spec_kind]


STAGES: tuple[Stage, ...] = (
    Stage("subject", "subjects", "subjects", "sae_clt.stages.subject", None,
          outs=(Out("runs/subjects/${key}"),), metrics=("metrics/subjects/${key}.json",),
          about="The built-in subject, trained by saeclt: reruns when its spec or code changes."),
    Stage("fingerprint", "subjects", "loaded_subjects", "sae_clt.stages.subject", None,
          outs=(Out("runs/subjects/${key}"),), metrics=("metrics/subjects/${key}.json",), always_changed=True,
          about="Models and activation files saeclt does not train: loaded and fingerprinted on every run (cheap), so a "
                "swapped weights or activation file reruns what depends on it, and an unchanged one reruns nothing."),
    Stage("collect", "datasets", "datasets", "sae_clt.stages.collect", ("subject", "collect"),
          deps=("runs/subjects/${item.subject}",),
          outs=(Out("runs/datasets/${key}/store", cache=False, persist=True),),
          about="Regenerable and large, so not cached (no second copy on disk); persisted so that a killed collection "
                "resumes after its last complete shard."),
    Stage("normalize", "datasets", "datasets", "sae_clt.stages.normalize", ("normalize",),
          deps=("runs/datasets/${key}/store",),
          outs=(Out("runs/datasets/${key}/normalize"),), metrics=("metrics/datasets/${key}.json",)),
    Stage("train", "experiments", "experiments", "sae_clt.stages.train", ("dataset", "source", "target", "model", "train"),
          deps=("runs/datasets/${item.dataset}/store", "runs/datasets/${item.dataset}/normalize"),
          outs=(Out("runs/experiments/${key}/dictionary"),), metrics=("metrics/${key}/train.json",),
          plots=("metrics/${key}/curves",)),
    Stage("evaluate", "experiments", "experiments", "sae_clt.stages.evaluate", ("evaluate",),
          deps=("runs/subjects/${item.subject}", "runs/datasets/${item.dataset}/store",
                "runs/datasets/${item.dataset}/normalize", "runs/experiments/${key}/dictionary"),
          outs=(Out("runs/experiments/${key}/eval"),), metrics=("metrics/${key}/eval.json",)),
    Stage("analyze", "experiments", "experiments", "sae_clt.stages.analyze", None,
          deps=("runs/subjects/${item.subject}", "runs/datasets/${item.dataset}/store",
                "runs/datasets/${item.dataset}/normalize", "runs/experiments/${key}/dictionary"),
          outs=(Out("runs/experiments/${key}/analysis"),), metrics=("metrics/${key}/analysis.json",),
          about="Every latent read on the validation rows, the top features ablated and the spec's interventions run in "
                "the subject's task. Reads analyze, interventions and the shape of the dictionary, so the whole spec."),
    Stage("report", "experiments", "experiments", "sae_clt.stages.report", None,
          deps=("metrics/${key}/eval.json", "metrics/${key}/train.json", "metrics/${key}/curves", "runs/experiments/${key}/eval",
                "metrics/${key}/analysis.json", "runs/experiments/${key}/analysis"),
          outs=(Out("reports/${key}", cache=False),),
          about="The report prints the whole resolved spec, so it reads every section. Its features/ folder (the "
                "dashboard) is regenerable and large, so git ignores it."),
    Stage("export", "experiments", "experiments", "sae_clt.stages.export", ("export",),
          deps=("runs/experiments/${key}/dictionary", "runs/experiments/${key}/eval"),
          outs=(Out("runs/experiments/${key}/export"),)),
)

BY_NAME = {s.name: s for s in STAGES}
COMMANDS = tuple(dict.fromkeys(s.command for s in STAGES))  # what `saeclt stage NAME` accepts


def stage(name: str) -> Stage:
    return BY_NAME[name]


def tracked_sections(spec_kind: str) -> list[str]:
    """The top-level keys of a spec of this kind that some stage tracks as a DVC parameter (DVC
    fails on a tracked key absent from the file, so a spec must write them out)."""
    keys: list[str] = []
    for s in STAGES:
        if s.spec_kind == spec_kind and s.sections is not None:
            keys += [k for k in s.sections if k not in keys]
    return keys


def run_targets(experiment_id: str) -> list[str]:
    """DVC targets that run an experiment's whole chain (DVC adds the stages they depend on)."""
    return [f"{s.name}@{experiment_id}" for s in STAGES if s.spec_kind == "experiments"]


def output_paths(index: dict) -> list[str]:
    """Every stage output of the experiments, datasets and subjects in ``index`` (params.yaml's
    groups), as project-relative paths."""
    paths = []
    for s in STAGES:
        for key, item in (index.get(s.foreach) or {}).items():
            for out in s.outs:
                path = out.path.replace("${key}", key)
                for field_name, value in (item or {}).items():
                    path = path.replace("${item." + field_name + "}", str(value))
                paths.append(path)
    return list(dict.fromkeys(paths))


def refuse_linked_outputs(root: Path, index: dict) -> None:
    """A stage output that is a symbolic link is refused before DVC runs: DVC removes a stage's
    outputs before running it, and on a link it changes the permissions of the folder the link
    points to (outside saeclt's outputs). A linked parent folder (e.g. runs/) is fine."""

    for rel in output_paths(index):
        path = Path(root) / rel
        if path.is_symlink():
            raise DataError(f"{path}: is a symbolic link (to {os.readlink(path)}); DVC would change the permissions of what it "
                            "points to when it replaces this output. Replace the link with a folder, or link a parent folder "
                            "(such as runs/) instead, then run again")


def run_stage(name: str, spec_path: str | Path, shard: tuple[int, int] | None = None) -> None:
    """Run stage command ``name`` on a spec file (what dvc.yaml's commands call)."""

    if name not in COMMANDS:
        raise SpecError(str(spec_path), [f"unknown stage '{name}'; stages: {', '.join(COMMANDS)}"])
    module = importlib.import_module(next(s.module for s in STAGES if s.command == name))
    if shard is not None:
        if name != "collect":
            raise SpecError(str(spec_path), ["--shard applies to the collect stage only"])
        module.run(Path(spec_path), shard)
        return
    module.run(Path(spec_path))
