"""The analyze stage's cost against one evaluate pass over the same validation rows, side by side
in one process, alternating (the target: analysis <= 1.5 x evaluate).

  evaluate pass  the evaluate stage's loop (encode + decode, top activations, reconstruction,
                 per-layer, linear-baseline and sparsity meters; the baseline's weights are
                 not fitted here, the loop's work is the same)
  analysis pass  the one pass of the analyze stage plus every statistic of stats.safetensors
  analysis, all  the whole analyze() call: pass, statistics, examples, the subject's views
                 (text: tokens; logit effects for causal LMs), files written to a scratch folder;
                 the subject's inputs (text windows from the corpus) are built once beforehand
                 and timed apart, as the evaluate stage's causal check builds them too

Both read the experiment's trained dictionary from runs/. Prints the median of each over the
rounds and the ratios.

    python benchmarks/analysis_cost.py [specs/minilm_sae_L2.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_description  # noqa: E402


def evaluate_pass(exp, store, norm, model) -> int:
    """The evaluate stage's loop over the validation rows (sae_clt.evaluation.evaluate)."""
    import torch

    from sae_clt.data.loader import PairLoader
    from sae_clt.evaluation.evaluate import TopActivations, apply_linear
    from sae_clt.evaluation.metrics import ReconstructionMeter, SparsityMeter

    source, target = exp.source_key, exp.target_key
    loader = PairLoader(store, norm, source, target, "val", exp.evaluate.batch_size, seed=0, shuffle=False)
    d_in, d_out = store.hook_dims[source], store.hook_dims[target]
    w_lin = torch.zeros(d_in + 1, d_out)
    recon, linear, sparsity = ReconstructionMeter(d_out), ReconstructionMeter(d_out), SparsityMeter(model.cfg.d_sae)
    layers = target.members if model.cfg.layout.layered else []
    per_layer = [ReconstructionMeter(d_out // len(layers)) for _ in layers]
    top = TopActivations(model.cfg.d_sae, n=5)
    rows = 0
    with torch.no_grad():
        for x, y, instance_id, position in loader.epoch(0, with_provenance=True):
            y_hat, z = model(x)
            top.update(z, instance_id, position)
            y_raw, y_hat_raw = norm.invert(target, y), norm.invert(target, y_hat)
            recon.update(y_raw, y_hat_raw)
            width = d_out // max(1, len(layers))
            for i, meter in enumerate(per_layer):
                meter.update(y_raw[:, i * width:(i + 1) * width], y_hat_raw[:, i * width:(i + 1) * width])
            linear.update(y_raw, norm.invert(target, apply_linear(w_lin, x)))
            sparsity.update(z)
            rows += x.shape[0]
    return rows


def analysis_pass(exp, store, norm, model) -> int:
    from sae_clt.analysis.analyze import read_codes
    from sae_clt.analysis.stats import feature_stats, raw_decoder

    codes = read_codes(exp, store, norm, model)
    feature_stats(codes, raw_decoder(model), exp.analyze)
    return codes.n_rows


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default="specs/minilm_sae_L2.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    from sae_clt.analysis.analyze import analyze
    from sae_clt.dictionaries.dictionary import Dictionary
    from sae_clt.stages.inputs import experiment_inputs
    from sae_clt.subjects import load_subject

    resolved, store, norm = experiment_inputs(Path(args.spec))
    exp, p = resolved.experiment, resolved.paths
    model = Dictionary.load(p.dictionary_dir(exp.id))
    subject = load_subject(resolved.subject, p.subject_dir(resolved.subject.id), p.root)
    subject.prepare_task(resolved.dataset)
    print(f"{exp.id}: {exp.model.architecture} {model.cfg.d_in} -> {model.cfg.d_sae} ({exp.model.activation}, k = {exp.model.k}); "
          f"evaluate batch {exp.evaluate.batch_size}, analyze batch {exp.analyze.batch_size}")
    print(f"CPU: {cpu_description()}, torch threads {torch.get_num_threads()}")
    # The views read the subject's inputs (text: its token windows, built from the corpus once and
    # cached; the evaluate stage's causal check builds the same): timed apart, before the rounds.
    from sae_clt.analysis.views import renderer

    t, _ = timed(lambda: renderer(subject).render(subject, resolved.dataset, [0]))
    print(f"subject inputs for the views (once per process, shared with the causal check): {t:.2f} s")
    times: dict[str, list[float]] = {"evaluate pass": [], "analysis pass": [], "analysis, all": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            t, rows = timed(lambda: evaluate_pass(exp, store, norm, model))
            times["evaluate pass"].append(t)
            t, analysed = timed(lambda: analysis_pass(exp, store, norm, model))
            times["analysis pass"].append(t)
            t, _ = timed(lambda: analyze(exp, resolved.dataset, store, norm, p.dictionary_dir(exp.id), subject,
                                         Path(tmp) / "analysis", Path(tmp) / "analysis.json"))
            times["analysis, all"].append(t)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    base = statistics.median(times["evaluate pass"])
    print(f"rows: evaluate {rows:,}, analysis {analysed:,}")
    for name, values in times.items():
        print(f"{name:>14}: median {statistics.median(values):6.2f} s  ({statistics.median(values) / base:.2f} x evaluate)")


if __name__ == "__main__":
    main()
