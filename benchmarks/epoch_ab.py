"""Paired A/B of end-to-end training: one epoch of an experiment trained by the sae_clt of a git
commit (A) and by the working tree's (B), each in its own process, alternating A, B, A, B, ...
Unlike step_ab.py (the step alone, in one process) this includes everything a training run
pays: the loader and its prefetch thread, start-up, logging. Prints each process's ms per step
(median of its trainings) and the median of the per-pair ratios B / A, the figure that holds up on
a machine whose speed drifts between runs.

Needs the experiment's dataset collected and normalised (e.g. after `saeclt run SPEC`).

    python benchmarks/epoch_ab.py COMMIT [--spec specs/minilm_sae_L2.yaml] [--pairs 6] [--runs 3] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD_ROOT = "SAECLT_AB_ROOT"  # set in a child: import sae_clt from this folder


def child(spec_path: str, runs: int, precision: str) -> None:
    """Train ``runs`` epochs with the sae_clt found under $SAECLT_AB_ROOT; print one JSON line.
    (Not through _common.py: importing it puts the working tree first on sys.path.)"""
    # An editable install would import the working tree's package whatever sys.path says.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ and "editable" not in getattr(f, "__name__", "")]
    sys.path.insert(0, os.environ[CHILD_ROOT])
    import sae_clt

    try:  # the package's layout at the commit: folders by concern, or the earlier flat one
        from sae_clt.stages.inputs import experiment_inputs as _experiment
        from sae_clt.training.loop import train
    except ImportError:
        from sae_clt.stages import _experiment  # noqa: I001 - the earlier layout's two modules
        from sae_clt.train import train

    resolved, store, norm = _experiment(Path(spec_path))
    spec = resolved.experiment
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"step": "fast", "precision": precision, "decoder_refit_frac": 0.0, "echo": 1})})
    ms = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            summary = train(spec, store, norm, tmp / "d", tmp / "c", tmp / "t.json", log=lambda *_: None)
            seconds = json.loads((tmp / "train_log.json").read_text())["seconds"]
        ms.append(1000 * seconds / summary["steps"])
    print(json.dumps({"package": str(Path(sae_clt.__file__).parent), "ms_per_step": ms}))


def run_child(root: Path, args) -> float:
    env = {**os.environ, CHILD_ROOT: str(root)}
    done = subprocess.run([sys.executable, __file__, "--child", "--spec", args.spec, "--runs", str(args.runs), "--precision", args.precision],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"the run with {root} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(root.resolve()):  # else A and B ran the same code
        raise SystemExit(f"the run meant for {root} imported sae_clt from {result['package']}")
    return statistics.median(result["ms_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", nargs="?")
    parser.add_argument("--spec", default="specs/minilm_sae_L2.yaml")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3, help="trainings per process")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.spec, args.runs, args.precision)
    if not args.commit:
        parser.error("name the commit to compare the working tree with")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git -C {ROOT} archive {args.commit} sae_clt | tar -x -C {tmp}", shell=True, check=True)
        print(f"{args.spec}: fast {args.precision}, one epoch, {args.runs} trainings per process; A = {args.commit}, B = working tree")
        ratios = []
        for pair in range(args.pairs):
            a, b = run_child(Path(tmp), args), run_child(ROOT, args)
            ratios.append(b / a)
            print(f"pair {pair + 1}: A {a:.1f} ms/step, B {b:.1f} ms/step, B / A {b / a:.3f}", flush=True)
    print(f"median B / A time per step: {statistics.median(ratios):.3f} (below 1: the working tree is faster)")


if __name__ == "__main__":
    main()
