"""Stage `report`: the experiment's metrics, curves and top features as Markdown and HTML.
specs/<e>.yaml -> reports/<e>/report.{md,html}"""

from __future__ import annotations

from pathlib import Path

from ..report.render import render_report
from ..spec.project import resolve_experiment
from .common import log


def run(spec_path: Path) -> None:
    resolved = resolve_experiment(spec_path)
    p, exp = resolved.paths, resolved.experiment
    written = render_report(exp, p.eval_metrics(exp.id), p.train_metrics(exp.id), p.eval_tensors(exp.id),
                            p.curves_dir(exp.id), p.subject_metrics(resolved.subject.id), p.report_dir(exp.id))
    log(f"[report] wrote {', '.join(str(w.relative_to(p.root)) for w in written)}")
