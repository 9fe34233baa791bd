"""Stage `analyze`: every latent of the trained dictionary read on the validation rows (frequency,
activations, histogram, score, top and quantile examples in the subject's own terms, co-firing,
decoder neighbours), the top features ablated and the spec's interventions run in the subject's
task.  specs/<e>.yaml -> runs/experiments/<e>/analysis/, metrics/<e>/analysis.json"""

from __future__ import annotations

from pathlib import Path

from ..analysis.analyze import analyze
from ..devices import experiment_device
from ..subjects import load_subject
from .common import log
from .inputs import experiment_inputs


def run(spec_path: Path) -> None:
    resolved, store, norm = experiment_inputs(spec_path)
    p, exp = resolved.paths, resolved.experiment
    device = experiment_device(exp)
    subject = load_subject(resolved.subject, p.subject_dir(resolved.subject.id), p.root).to(device)
    subject.prepare_task(resolved.dataset)
    summary = analyze(exp, resolved.dataset, store, norm, p.dictionary_dir(exp.id), subject,
                      p.analysis_dir(exp.id), p.analysis_metrics(exp.id), device)
    log(f"[analyze] {exp.id}: {summary['latents']} latents on {summary['rows']:,} rows, "
        f"{summary['alive_fraction']:.1%} alive, {summary['band']['count']} in the frequency band")
