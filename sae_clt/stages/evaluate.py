"""Stage `evaluate`: the trained dictionary on the validation split (reconstruction, sparsity,
causal check in the subject's task).  specs/<e>.yaml -> runs/experiments/<e>/eval/, metrics/<e>/eval.json"""

from __future__ import annotations

from pathlib import Path

from ..devices import experiment_device
from ..evaluation.evaluate import evaluate
from ..subjects import load_subject
from .common import log
from .inputs import check_fits_in_memory, experiment_inputs


def run(spec_path: Path) -> None:
    resolved, store, norm = experiment_inputs(spec_path)
    p, exp = resolved.paths, resolved.experiment
    check_fits_in_memory(exp, store, spec_path, exp.evaluate.batch_size, "evaluate.batch_size")
    # The subject runs the causal check and describes the top-activating rows.
    device = experiment_device(exp)
    subject = load_subject(resolved.subject, p.subject_dir(resolved.subject.id), p.root).to(device)
    subject.prepare_task(resolved.dataset)
    m = evaluate(exp, store, norm, p.dictionary_dir(exp.id), subject, p.eval_dir(exp.id), p.eval_metrics(exp.id), device)
    line = (f"[evaluate] {exp.id}: FVU {m['reconstruction']['fvu']:.4f} (linear {m['linear_baseline']['fvu']:.4f}), "
            f"L0 {m['sparsity']['l0']:.1f}, dead {m['sparsity']['dead_fraction']:.3f}")
    for metric, block in m.get("causal", {}).items():
        pct = block["pct_change_vs_clean"]
        line += f"; {metric} {pct['dictionary'] or 0:+.2f}%"
        if "linear_baseline" in pct:
            line += f" (linear {pct['linear_baseline'] or 0:+.2f}%)"
    log(line)
