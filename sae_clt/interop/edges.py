"""Stage `export`: attribution-graph edges of a dictionary, as JSON and CSV.

For every feature (live ones unless export.include_dead): its strongest source dims (encoder
column) and target dims (decoder row), top_k each, dropping |weight| < threshold. Weights are in
raw activation space: the normalisation is folded in (encoder column / source scale, decoder
row x target scale), so edges read directly against the subject's own activations.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from ..data.hook_groups import HookGroup, dim_label
from ..dictionaries.dictionary import Dictionary
from ..dictionaries.raw import raw_weights
from ..io import atomic_write_text, write_json
from ..provenance import output_meta
from ..spec.models import ExperimentSpec

EXPORT_SECTIONS = ["dataset", "source", "target", "model", "train", "export"]


def folded_weights(model: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder [d_in, d_sae] and decoder [d_sae, d_out] acting on raw activations (the one fold,
    ``dictionaries.raw``, computed in float64)."""
    w = raw_weights(model, centered=False).to(torch.float32)
    return w.W_enc, w.W_dec


def _member_dims(group: HookGroup, total: int) -> dict[str, int]:
    """Width of each member of a (possibly grouped) hook point: a clt's layers are equally wide."""
    parts = group.members
    return {m: total // len(parts) for m in parts}


def _top(weights: torch.Tensor, k: int, threshold: float) -> list[tuple[int, float]]:
    k = min(k, weights.numel())
    idx = weights.abs().topk(k).indices.tolist()
    return [(i, float(weights[i])) for i in idx if abs(float(weights[i])) >= threshold]


def export_edges(spec: ExperimentSpec, dictionary_dir: Path, density: torch.Tensor | None, out_dir: Path) -> dict:
    cfg = spec.export
    model = Dictionary.load(dictionary_dir)
    w_enc, w_dec = folded_weights(model)
    features = range(model.cfg.d_sae)
    if density is not None and not cfg.include_dead:
        features = [i for i in features if float(density[i]) > 0]

    # Dimensions are named per hook point (a clt's source and target span several).
    src_dims, tgt_dims = _member_dims(spec.source_key, model.cfg.d_in), _member_dims(spec.target_key, model.cfg.d_out)
    edges = []
    for f in features:
        for dim, weight in _top(w_enc[:, f], cfg.top_k, cfg.threshold):
            edges.append({"source": dim_label(spec.source_key, dim, src_dims), "target": f"{spec.id}.feature[{f}]",
                          "kind": "encoder", "weight": weight})
        for dim, weight in _top(w_dec[f], cfg.top_k, cfg.threshold):
            edges.append({"source": f"{spec.id}.feature[{f}]", "target": dim_label(spec.target_key, dim, tgt_dims),
                          "kind": "decoder", "weight": weight})

    meta = output_meta(spec, spec.train.seed, EXPORT_SECTIONS)
    document = {
        "dictionary": spec.id,
        "source": spec.source,
        "target": spec.target,
        "space": "raw activations (normalisation folded into the weights)",
        "top_k": cfg.top_k,
        "threshold": cfg.threshold,
        "n_features": len(features),
        "n_edges": len(edges),
        "edges": edges,
        "meta": meta,
    }
    write_json(out_dir / "edges.json", document)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["source", "target", "kind", "weight"], lineterminator="\n")
    writer.writeheader()
    for edge in edges:
        writer.writerow({**edge, "weight": f"{edge['weight']:.6g}"})
    atomic_write_text(out_dir / "edges.csv", buf.getvalue())
    return {"n_features": len(features), "n_edges": len(edges)}
