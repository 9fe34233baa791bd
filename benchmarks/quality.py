"""FVU-L0 frontier of each activation at equal training tokens, plus tokens/s.

On one experiment's dataset (default: the MiniLM layer-2 SAE, one epoch of ~453k tokens,
384 -> 3072 latents, batch 4096), sweeps each activation's sparsity knob with everything else
from the spec:

- topk and batchtopk: k in {16, 32, 64};
- jumprelu: train.l0_coeff in {3e-4, 1e-3, 3e-3};
- relu + L1: train.l1_coeff in {3e-3, 1e-2, 3e-2}.

Prints held-out FVU, L0, dead fraction and training tokens/s for each point (causal check off).

    python benchmarks/quality.py [specs/minilm_sae_L2.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fit_and_evaluate, load_experiment  # noqa: E402

SWEEPS = [
    ("topk", "k", [16, 32, 64]),
    ("batchtopk", "k", [16, 32, 64]),
    ("jumprelu", "l0_coeff", [3e-4, 1e-3, 3e-3]),
    ("relu", "l1_coeff", [3e-3, 1e-2, 3e-2]),
]


def main() -> None:
    base, store, norm = load_experiment(sys.argv)
    print(f"{'activation':<11}{'knob':<16}{'val FVU':>9}{'L0':>8}{'dead':>8}{'tokens/s':>10}")
    for activation, knob, values in SWEEPS:
        for value in values:
            model_updates = {"activation": activation, **({"k": value} if knob == "k" else {})}
            train_updates = {} if knob == "k" else {knob: value}
            _, m, rate = fit_and_evaluate(base, store, norm, train_updates, model_updates)
            print(f"{activation:<11}{f'{knob}={value:g}':<16}{m['reconstruction']['fvu']:>9.4f}{m['sparsity']['l0']:>8.1f}"
                  f"{m['sparsity']['dead_fraction']:>8.3f}{rate:>10,.0f}", flush=True)


if __name__ == "__main__":
    main()
