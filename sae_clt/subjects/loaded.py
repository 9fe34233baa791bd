"""What stage `subject` records for a model saeclt loads rather than trains (a Hugging Face
model or a user's torch module): its fingerprint, architecture and size, in the stage's
config.json and metrics file."""

from __future__ import annotations

from pathlib import Path

from ..io import write_json
from ..provenance import output_meta


def record_loaded_model(spec, subject, details: dict, out_dir: Path, metrics_path: Path, log=print) -> dict:
    """Write ``runs/subjects/<id>/config.json`` (``details`` first: the kind and where the model
    came from) and the stage's metrics for a loaded ``subject``; returns the config."""
    n_params = sum(p.numel() for p in subject.model.parameters())
    meta = output_meta(spec, 0)
    info = {**details, "fingerprint": subject.fingerprint(), "architecture": type(subject.model).__name__,
            "parameters": n_params, "meta": meta}
    write_json(out_dir / "config.json", info)
    write_json(metrics_path, {"parameters": n_params, "meta": meta})
    log(f"[subject] {spec.id}: {info['architecture']} with {n_params:,} parameters, fingerprint {info['fingerprint']}")
    return info
