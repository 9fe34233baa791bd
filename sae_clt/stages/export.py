"""Stage `export`: the dictionary's live features as attribution-graph edges (strongest source
and target dims per feature).  specs/<e>.yaml -> runs/experiments/<e>/export/edges.{json,csv}"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ..interop.edges import export_edges
from ..spec.project import resolve_experiment
from .common import log


def run(spec_path: Path) -> None:
    resolved = resolve_experiment(spec_path)
    p, exp = resolved.paths, resolved.experiment
    density = load_file(p.eval_tensors(exp.id))["feature_density"]
    result = export_edges(exp, p.dictionary_dir(exp.id), density, p.export_dir(exp.id))
    log(f"[export] {exp.id}: {result['n_edges']} edges over {result['n_features']} live features")
