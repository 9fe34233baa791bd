"""Stage `subject`: train the built-in subject (TSP policy), or load a model / activation files
and record their fingerprint.  specs/subjects/<s>.yaml -> runs/subjects/<s>/, metrics/subjects/<s>.json"""

from __future__ import annotations

from pathlib import Path

from ..spec.models import load_spec
from ..spec.project import Paths, find_root
from ..subjects import train_subject
from .common import log


def run(spec_path: Path) -> None:
    spec = load_spec(spec_path, "subjects")
    paths = Paths(find_root(Path(spec_path).parent))
    log(f"[subject] preparing {spec.id} ({spec.kind})")
    result = train_subject(spec, paths.subject_dir(spec.id), paths.subject_metrics(spec.id), log=log, root=paths.root)
    if spec.kind == "tsp":
        lengths = result["mean_tour_length"]
        log(f"[subject] {spec.id}: policy {lengths['policy_greedy']:.4f}, nearest neighbour {lengths['nearest_neighbour']:.4f}, "
            f"trained in {result['train_seconds']:.0f}s")
