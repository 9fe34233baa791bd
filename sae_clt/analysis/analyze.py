"""Stage `analyze`'s work: every latent of the trained dictionary read on the validation rows.

Outputs (formats in docs/formats.md, "Feature analysis"):
  runs/experiments/<id>/analysis/stats.safetensors   per-latent statistics and examples' rows
  runs/experiments/<id>/analysis/examples.json       examples in the subject's own terms
  metrics/<id>/analysis.json                         the summary (reproducible byte for byte)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.loader import PairLoader
from ..data.normalize import Normalization
from ..data.store import ActivationStore
from ..dictionaries.dictionary import Dictionary
from ..interventions.effects import ablate_features, run_interventions
from ..io import atomic_write_text, save_safetensors, write_json
from ..provenance import output_meta
from ..spec.models import DatasetSpec, ExperimentSpec
from .examples import feature_examples
from .stats import SparseCodes, collect_codes, feature_stats, raw_decoder
from .views import renderer

STATS_FILE = "stats.safetensors"
EXAMPLES_FILE = "examples.json"
ANALYSIS_SECTIONS = ["dataset", "source", "target", "model", "train", "analyze", "interventions"]
TOP_BY_SCORE = 20
FREQUENCY_QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}


def read_codes(exp: ExperimentSpec, store: ActivationStore, norm: Normalization, model: Dictionary) -> SparseCodes:
    """The one pass: the validation rows in store order (the first analyze.rows), encoded. Only
    the source is read (the target plays no part in the codes)."""
    cfg = exp.analyze
    loader = PairLoader(store, norm, exp.source_key, exp.source_key, "val", cfg.batch_size, seed=0, shuffle=False)
    return collect_codes(model, loader, cfg.rows, desc=f"analyze {exp.id}", where=f"experiment '{exp.id}'")


def summary(exp: ExperimentSpec, stats: dict[str, torch.Tensor], codes: SparseCodes, device=None) -> dict:
    """metrics/<id>/analysis.json (the keys "ablations" and "interventions" are added by their own code)."""
    freq, score = stats["frequency"], stats["score"]
    alive = int((freq > 0).sum())
    ranked = [f for f in torch.sort(-score, stable=True).indices[:TOP_BY_SCORE].tolist() if score[f] > 0]
    low, high = exp.analyze.band
    return {
        "rows": codes.n_rows,
        "latents": codes.n_features,
        "alive_fraction": alive / codes.n_features,
        "mean_l0": codes.values.numel() / codes.n_rows,
        "band": {"low": low, "high": high, "count": int(stats["in_band"].sum())},
        "frequency_quantiles": {k: float(torch.quantile(freq.double(), q)) for k, q in FREQUENCY_QUANTILES.items()},
        "top_by_score": [{"feature": f, "score": float(score[f]), "frequency": float(freq[f]),
                          "magnitude": float(stats["magnitude"][f])} for f in ranked],
        "meta": output_meta(exp, exp.train.seed, ANALYSIS_SECTIONS, device),
    }


def examples_document(exp: ExperimentSpec, dataset: DatasetSpec, subject, codes: SparseCodes,
                      stats: dict[str, torch.Tensor], decoder: torch.Tensor) -> dict:
    """examples.json: every feature's examples, the instances they refer to rendered by the
    subject kind's renderer, and (text subjects) the logit effects."""
    view = renderer(subject)
    window = None if view.KIND == "tsp" else exp.analyze.window  # a TSP example shows every city
    features, instance_ids = feature_examples(codes, stats, window)
    views = view.render(subject, dataset, instance_ids)
    doc = {"subject_kind": view.KIND, "window": exp.analyze.window,
           "instances": {str(i): v for i, v in views.items()}, "features": features,
           "logit_effects": view.logit_effects(subject, decoder) if view.KIND == "text" else None}
    return doc


@torch.no_grad()
def analyze(exp: ExperimentSpec, dataset: DatasetSpec, store: ActivationStore, norm: Normalization, dictionary_dir: Path,
            subject, out_dir: Path, metrics_path: Path, device: torch.device | str = "cpu") -> dict:
    """Analyse every latent on the validation rows; write the analysis folder and the metrics file;
    return the metrics. The codes and the interventions are computed on ``device`` (the subject
    should be there too), the statistics on the CPU."""
    model = Dictionary.load(dictionary_dir).to(device)
    codes = read_codes(exp, store, norm, model)
    decoder = raw_decoder(model)
    stats = feature_stats(codes, decoder, exp.analyze)
    save_safetensors(Path(out_dir) / STATS_FILE, stats, metadata={"rows": str(codes.n_rows)})
    doc = examples_document(exp, dataset, subject, codes, stats, decoder)
    # compact (the file is read by the dashboard, not by people) and sorted: the same bytes each run
    atomic_write_text(Path(out_dir) / EXAMPLES_FILE,
                      json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n")
    metrics = summary(exp, stats, codes, device)
    metrics.update(interventions(exp, subject, model, norm, stats))  # (intervene places them on the subject's device)
    write_json(metrics_path, metrics)
    return metrics


def interventions(exp: ExperimentSpec, subject, model: Dictionary, norm: Normalization, stats: dict[str, torch.Tensor]) -> dict:
    """What features do: the top ``analyze.ablate_top`` by score (those that fire) each set to 0
    in the subject's task, and the spec's own interventions (error term kept unless they say)."""
    if getattr(subject, "model", None) is None:
        reason = "the dataset's activations were imported: there is no model to intervene on"
        return {"ablations": [], "interventions": [], "interventions_skipped": reason}
    score = stats["score"]
    order = [f for f in torch.sort(-score, stable=True).indices[:exp.analyze.ablate_top].tolist() if score[f] > 0]
    return {"ablations": ablate_features(subject, model, norm, exp, order, [float(score[f]) for f in order]),
            "interventions": run_interventions(subject, model, norm, exp)}
