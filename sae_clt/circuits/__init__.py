"""Circuits: feature-to-feature edges between dictionaries in series (``trace``), written as a
graph, a table and a picture (``graph``)."""

from __future__ import annotations

from pathlib import Path

from ..dictionaries.dictionary import CONFIG, WEIGHTS, Dictionary
from ..errors import DataError
from ..stages.inputs import experiment_inputs
from .graph import document, write_trace
from .trace import trace


def _dictionary(resolved, spec_path: Path) -> Dictionary:
    folder = resolved.paths.dictionary_dir(resolved.experiment.id)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise DataError(f"experiment '{resolved.experiment.id}' has no trained dictionary yet ({folder}); "
                        f"train it with `saeclt run {spec_path}`")
    return Dictionary.load(folder)


def run_trace(upstream: Path, downstream: Path, features: int = 16, inputs: int = 8, rows: int | None = 4096) -> tuple[Path, dict]:
    """Trace the dictionary of experiment spec ``upstream`` into that of ``downstream`` on the
    held-out rows; write reports/traces/<up>--<down>/. Returns the folder and trace.json's content."""
    up_resolved, store, norm = experiment_inputs(Path(upstream))
    down_resolved, _, _ = experiment_inputs(Path(downstream))
    up_spec, down_spec = up_resolved.experiment, down_resolved.experiment
    up, down = _dictionary(up_resolved, upstream), _dictionary(down_resolved, downstream)
    at, result = trace(up, down, up_spec, down_spec, store, norm, max_rows=rows)
    doc = document(up_spec.id, down_spec.id, at, result, features, inputs)
    out = up_resolved.paths.root / "reports" / "traces" / f"{up_spec.id}--{down_spec.id}"
    write_trace(out, doc)
    return out, doc
