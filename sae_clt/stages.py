"""The pipeline's stages as plain functions of a spec file: what `dvc repro` runs through
`saeclt stage NAME SPEC`. Each reads its inputs from disk and writes its outputs atomically.

    subject    specs/subjects/<s>.yaml  -> runs/subjects/<s>/, metrics/subjects/<s>.json
    collect    specs/datasets/<d>.yaml  -> runs/datasets/<d>/store/
    normalize  specs/datasets/<d>.yaml  -> runs/datasets/<d>/normalize/, metrics/datasets/<d>.json
    train      specs/<e>.yaml           -> runs/experiments/<e>/dictionary/, metrics/<e>/train.json, curves
    evaluate   specs/<e>.yaml           -> runs/experiments/<e>/eval/, metrics/<e>/eval.json
    report     specs/<e>.yaml           -> reports/<e>/report.{md,html}
    export     specs/<e>.yaml           -> runs/experiments/<e>/export/edges.{json,csv}
"""

from __future__ import annotations

import sys
from pathlib import Path

from .project import Paths, find_root, resolve_dataset, resolve_experiment
from .spec import load_spec

STAGES = ("subject", "collect", "normalize", "train", "evaluate", "report", "export")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stage_subject(spec_path: Path) -> None:
    from .subjects import train_subject

    spec = load_spec(spec_path, "subjects")
    paths = Paths(find_root(spec_path.parent))
    _log(f"[subject] preparing {spec.id} ({spec.kind})")
    result = train_subject(spec, paths.subject_dir(spec.id), paths.subject_metrics(spec.id), log=_log, root=paths.root)
    if spec.kind == "tsp":
        lengths = result["mean_tour_length"]
        _log(f"[subject] {spec.id}: policy {lengths['policy_greedy']:.4f}, nearest neighbour {lengths['nearest_neighbour']:.4f}, "
             f"trained in {result['train_seconds']:.0f}s")


def _dataset(spec_path: Path):
    paths = Paths(find_root(spec_path.parent))
    dataset, subject_spec = resolve_dataset(paths, spec_path.stem)
    return paths, dataset, subject_spec


def stage_collect(spec_path: Path, shard: tuple[int, int] | None = None) -> None:
    from .collect import check_activations_root, collect, complete_parts, merge_parts, part_status
    from .subjects import load_subject

    paths, dataset, subject_spec = _dataset(spec_path)
    external = paths.external_store_dir(dataset.id)
    if external is not None:
        check_activations_root(external.parent)
    target = external or paths.store_dir(dataset.id)
    n_parts = complete_parts(target) if shard is None and target.exists() else None
    status = part_status(target) if shard is None and target.exists() else None
    if status and not n_parts:
        from .errors import DataError

        raise DataError(f"{target}: {status[0]} of {status[1]} worker parts are complete (saeclt stage collect {spec_path} "
                        f"--shard i/{status[1]}); finish the others, or delete {target}/part-* to collect in one process")
    if n_parts:  # workers (--shard i/n) collected every part: join them
        manifest = merge_parts(target, n_parts)
        _log(f"[collect] {dataset.id}: merged {n_parts} worker parts")
    else:
        subject = load_subject(subject_spec, paths.subject_dir(subject_spec.id), paths.root)
        subject.configure(dataset)
        manifest = collect(dataset, subject, target, part=shard)
        if shard is not None:
            _log(f"[collect] {dataset.id}: part {shard[0]} of {shard[1]}: {manifest['n_rows']} rows; "
                 f"`saeclt stage collect {spec_path}` (or saeclt run / dvc repro) merges the parts once all are complete")
            return
    if external is not None:
        from .store import write_pointer

        write_pointer(paths.store_dir(dataset.id), external)
        _log(f"[collect] {dataset.id}: store under $ACTIVATIONS_ROOT at {external}")
    _log(f"[collect] {dataset.id}: {manifest['n_rows']} rows x {len(manifest['hook_points'])} hook points in {len(manifest['shards'])} shards")


def stage_normalize(spec_path: Path) -> None:
    from .normalize import fit_normalization
    from .store import ActivationStore

    paths, dataset, _ = _dataset(spec_path)
    store = ActivationStore.open(paths.store_dir(dataset.id))
    summary = fit_normalization(dataset, store, paths.norm_dir(dataset.id), paths.dataset_metrics(dataset.id))
    _log(f"[normalize] {dataset.id}: {summary['n_val_instances']} of {summary['n_instances']} instances held out for validation")


def _experiment(spec_path: Path):
    from .normalize import Normalization
    from .store import ActivationStore

    resolved = resolve_experiment(spec_path)
    store = ActivationStore.open(resolved.paths.store_dir(resolved.dataset.id))
    exp, collect = resolved.experiment, resolved.dataset.collect
    store.check_matches(collect.hook_points, collect.dtype, collect.n_instances,
                        str(resolved.paths.dataset_spec(resolved.dataset.id).relative_to(resolved.paths.root)))
    store.check_hooks([exp.source_key, exp.target_key], str(spec_path))
    norm = Normalization.load(resolved.paths.norm_dir(resolved.dataset.id))
    return resolved, store, norm


def stage_train(spec_path: Path) -> None:
    from .train import check_fits_in_memory, train

    resolved, store, norm = _experiment(spec_path)
    check_fits_in_memory(resolved.experiment, store, spec_path, resolved.experiment.train.batch_size, "train.batch_size")
    p, eid = resolved.paths, resolved.experiment.id
    train(resolved.experiment, store, norm, p.dictionary_dir(eid), p.curves_dir(eid), p.train_metrics(eid), log=_log,
          checkpoint_dir=p.checkpoint_dir(eid))


def stage_evaluate(spec_path: Path) -> None:
    from .evaluate import evaluate
    from .subjects import load_subject
    from .train import check_fits_in_memory

    resolved, store, norm = _experiment(spec_path)
    p, exp = resolved.paths, resolved.experiment
    check_fits_in_memory(exp, store, spec_path, exp.evaluate.batch_size, "evaluate.batch_size")
    # The subject runs the causal check and describes the top-activating rows.
    subject = load_subject(resolved.subject, p.subject_dir(resolved.subject.id), p.root)
    subject.prepare_task(resolved.dataset)
    m = evaluate(exp, store, norm, p.dictionary_dir(exp.id), subject, p.eval_dir(exp.id), p.eval_metrics(exp.id))
    line = f"[evaluate] {exp.id}: FVU {m['reconstruction']['fvu']:.4f} (linear {m['linear_baseline']['fvu']:.4f}), L0 {m['sparsity']['l0']:.1f}, dead {m['sparsity']['dead_fraction']:.3f}"
    for metric, block in m.get("causal", {}).items():
        pct = block["pct_change_vs_clean"]
        line += f"; {metric} {pct['dictionary'] or 0:+.2f}%"
        if "linear_baseline" in pct:
            line += f" (linear {pct['linear_baseline'] or 0:+.2f}%)"
    _log(line)


def stage_report(spec_path: Path) -> None:
    from .evaluate import EVAL_TENSORS
    from .report import render_report

    resolved = resolve_experiment(spec_path)
    p, exp = resolved.paths, resolved.experiment
    written = render_report(exp, p.eval_metrics(exp.id), p.train_metrics(exp.id), p.eval_dir(exp.id) / EVAL_TENSORS,
                            p.curves_dir(exp.id), p.subject_metrics(resolved.subject.id), p.report_dir(exp.id))
    _log(f"[report] wrote {', '.join(str(w.relative_to(p.root)) for w in written)}")


def stage_export(spec_path: Path) -> None:
    from safetensors.torch import load_file

    from .evaluate import EVAL_TENSORS
    from .export import export_edges

    resolved = resolve_experiment(spec_path)
    p, exp = resolved.paths, resolved.experiment
    density = load_file(p.eval_dir(exp.id) / EVAL_TENSORS)["feature_density"]
    result = export_edges(exp, p.dictionary_dir(exp.id), density, p.export_dir(exp.id))
    _log(f"[export] {exp.id}: {result['n_edges']} edges over {result['n_features']} live features")


def run_stage(name: str, spec_path: str | Path, shard: tuple[int, int] | None = None) -> None:
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    if shard is not None:
        if name != "collect":
            raise ValueError("--shard applies to the collect stage only")
        stage_collect(Path(spec_path), shard)
        return
    globals()[f"stage_{name}"](Path(spec_path))
