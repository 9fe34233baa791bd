"""FVU-L0 frontier of each activation at equal training tokens, plus tokens/s.

On one experiment's dataset (default: the MiniLM layer-2 SAE, one epoch of ~453k tokens,
384 -> 3072 latents, batch 4096), sweeps each activation's sparsity knob with everything else
from the spec:

- topk and batchtopk: k in {16, 32, 64};
- jumprelu: train.l0_coeff in {3e-4, 1e-3, 3e-3};
- relu + L1: train.l1_coeff in {3e-3, 1e-2, 3e-2}.

Prints held-out FVU, L0, dead fraction and training tokens/s for each point (causal check off).

    python benchmarks/quality.py [specs/minilm_sae_L2.yaml] [--only jumprelu] [--echo 1]

--echo (default 1) overrides the spec's data echoing, so the frontier compares the activations'
recipes at one step per batch; jumprelu starts from data init (latents = sampled rows: with a
random decoder its thresholds shut most latents before the decoder is useful).
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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default="specs/minilm_sae_L2.yaml")
    parser.add_argument("--only", choices=[a for a, _, _ in SWEEPS], help="sweep one activation only")
    parser.add_argument("--echo", type=int, default=1, help="train.echo for every point (default 1)")
    args = parser.parse_args()
    base, store, norm = load_experiment([sys.argv[0], args.spec])
    print(f"{'activation':<11}{'knob':<16}{'val FVU':>9}{'L0':>8}{'dead':>8}{'tokens/s':>10}")
    for activation, knob, values in SWEEPS:
        if args.only and activation != args.only:
            continue
        for value in values:
            model_updates = {"activation": activation, **({"k": value} if knob == "k" else {})}
            train_updates = {"echo": args.echo, **({} if knob == "k" else {knob: value}),
                             **({"init": "data"} if activation == "jumprelu" else {})}
            _, m, rate = fit_and_evaluate(base, store, norm, train_updates, model_updates)
            print(f"{activation:<11}{f'{knob}={value:g}':<16}{m['reconstruction']['fvu']:>9.4f}{m['sparsity']['l0']:>8.1f}"
                  f"{m['sparsity']['dead_fraction']:>8.3f}{rate:>10,.0f}", flush=True)


if __name__ == "__main__":
    main()
