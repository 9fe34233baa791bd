"""Does the fast step cost quality? Train one experiment's dictionary with the plain autograd
step and with the fast step (fp32 and bf16), same data, seed and epochs, and print the
held-out FVU, L0, dead fraction and rows/s of each.

Needs the experiment's dataset collected and normalised (e.g. after `saeclt run SPEC`).

    python benchmarks/fast_vs_plain.py specs/minilm_sae_L2.yaml
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_clt.evaluate import evaluate  # noqa: E402
from sae_clt.stages import _experiment  # noqa: E402
from sae_clt.train import train  # noqa: E402


def main() -> None:
    spec_path = Path(sys.argv[1] if len(sys.argv) > 1 else "specs/minilm_sae_L2.yaml")
    resolved, store, norm = _experiment(spec_path)
    base = resolved.experiment
    print(f"{base.id}: {base.model.architecture} {store.hook_dims[base.source]} -> {base.model.d_sae}, k = {base.model.k}, "
          f"batch {base.train.batch_size}, {base.train.epochs} epoch(s)")
    print(f"{'step':<6}{'precision':<11}{'val FVU':>9}{'L0':>7}{'dead':>8}{'rows/s':>10}")
    results = {}
    for step in ("plain", "fast"):
        for precision in ("fp32", "bf16"):
            # The decoder refit (fast step only) is off in both: this compares the steps themselves.
            spec = base.model_copy(update={"train": base.train.model_copy(update={"step": step, "precision": precision,
                                                                                  "decoder_refit_frac": 0.0}),
                                           "evaluate": base.evaluate.model_copy(update={"causal": False})})
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                started = time.perf_counter()
                summary = train(spec, store, norm, tmp / "dictionary", tmp / "curves", tmp / "train.json", log=lambda *_: None)
                seconds = time.perf_counter() - started
                m = evaluate(spec, store, norm, tmp / "dictionary", None, tmp / "eval", tmp / "eval.json")
            rate = summary["rows_seen"] / seconds
            results[(step, precision)] = m["reconstruction"]["fvu"]
            print(f"{step:<6}{precision:<11}{m['reconstruction']['fvu']:>9.4f}{m['sparsity']['l0']:>7.1f}"
                  f"{m['sparsity']['dead_fraction']:>8.3f}{rate:>10,.0f}")
    for precision in ("fp32", "bf16"):
        plain, fast = results[("plain", precision)], results[("fast", precision)]
        print(f"{precision}: fast FVU / plain FVU = {fast / plain:.4f}")
    print(json.dumps({f"{s}/{p}": v for (s, p), v in results.items()}))


if __name__ == "__main__":
    main()
