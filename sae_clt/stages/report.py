"""Stage `report`: the experiment's metrics, curves and top features as Markdown and HTML, and
the interactive feature dashboard when the analysis outputs exist.
specs/<e>.yaml -> reports/<e>/report.{md,html}, reports/<e>/features/"""

from __future__ import annotations

from pathlib import Path

from ..report.dashboard import analysis_present, build_dashboard, dashboard_size
from ..report.render import render_report
from ..spec.project import Paths, resolve_experiment
from .common import log


def _dashboard(p: Paths, eid: str) -> dict | None:
    """Build reports/<e>/features/ from the analysis outputs; None (and a note) when there are none."""
    analysis, metrics = p.analysis_dir(eid), p.analysis_metrics(eid)
    if not analysis_present(analysis, metrics):
        log(f"[report] {eid}: no analysis outputs in {analysis.relative_to(p.root)} (the analyze stage), "
            "so no feature dashboard")
        return None
    out = p.dashboard_dir(eid)
    built = build_dashboard(eid, analysis, metrics, out)
    log(f"[report] {out.relative_to(p.root)}/index.html: {built['latents']} latents, "
        f"{dashboard_size(out) / 1e6:.1f} MB in {len(built['files'])} files")
    return built


def run(spec_path: Path) -> None:
    resolved = resolve_experiment(spec_path)
    p, exp = resolved.paths, resolved.experiment
    dashboard = _dashboard(p, exp.id)
    written = render_report(exp, p.eval_metrics(exp.id), p.train_metrics(exp.id), p.eval_tensors(exp.id),
                            p.curves_dir(exp.id), p.subject_metrics(resolved.subject.id), p.report_dir(exp.id),
                            dashboard=dashboard, analysis_metrics_path=p.analysis_metrics(exp.id))
    log(f"[report] wrote {', '.join(str(w.relative_to(p.root)) for w in written)}")
