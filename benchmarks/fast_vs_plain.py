"""Does the fast step cost quality? Train one experiment's dictionary with the plain autograd
step and with the fast step (fp32 and bf16), same data, seed and epochs, and print the
held-out FVU, L0, dead fraction and rows/s of each (end to end: loading, start-up and saving
included), and each run's time per batch over one dense encoder matmul of the batch's shape in
its precision, timed right after it (this host's speed drifts; the ratio carries across).

Needs the experiment's dataset collected and normalised (e.g. after `saeclt run SPEC`).

    python benchmarks/fast_vs_plain.py specs/minilm_sae_L2.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_description, encoder_matmul_ms, fit_and_evaluate, load_experiment  # noqa: E402


def main() -> None:
    base, store, norm = load_experiment(sys.argv)
    print(f"cpu: {cpu_description()}")
    import torch

    batch, d_in = base.train.batch_size, store.hook_dims[base.source]
    print(f"{'step':<6}{'precision':<11}{'val FVU':>9}{'L0':>7}{'dead':>8}{'rows/s':>10}{'matmul ms':>11}{'batch/matmul':>14}")
    results = {}
    for step in ("plain", "fast"):
        for precision in ("fp32", "bf16"):
            # The decoder refit (fast step only) is off in both: this compares the steps themselves.
            _, m, rate = fit_and_evaluate(base, store, norm, {"step": step, "precision": precision, "decoder_refit_frac": 0.0, "echo": 1})
            matmul = encoder_matmul_ms(batch, d_in, base.model.d_sae, torch.bfloat16 if precision == "bf16" else torch.float32)
            results[(step, precision)] = m["reconstruction"]["fvu"]
            print(f"{step:<6}{precision:<11}{m['reconstruction']['fvu']:>9.4f}{m['sparsity']['l0']:>7.1f}"
                  f"{m['sparsity']['dead_fraction']:>8.3f}{rate:>10,.0f}{matmul:>11.1f}{1000 * batch / rate / matmul:>14.2f}")
    for precision in ("fp32", "bf16"):
        plain, fast = results[("plain", precision)], results[("fast", precision)]
        print(f"{precision}: fast FVU / plain FVU = {fast / plain:.4f}")
    print(json.dumps({f"{s}/{p}": v for (s, p), v in results.items()}))


if __name__ == "__main__":
    main()
