"""Stage `report`: render reports/<id>/report.md and report.html from the metrics on disk.

Deterministic by construction: no timestamps, sorted inputs, matplotlib SVG with a fixed hash
salt and no date, so the same inputs give byte-identical files and a report diff across
commits shows only real changes. The HTML embeds its plots (no external resources) and
autoescapes everything that comes from data.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..io import atomic_write_text, read_json
from ..spec.models import ExperimentSpec, dump_spec_yaml
from .headline import effect_size

DATA_FILES = ("templates/report.md.j2", "templates/report.html.j2")  # read by the report stage (a DVC dependency)


def svg_text(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype so it embeds inline


def _read_curve(path: Path) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in path.read_text().splitlines()[1:]:
        s, v = line.split("\t")
        steps.append(int(s))
        values.append(float(v))
    return steps, values


def make_plots(curves_dir: Path, eval_tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "saeclt", "svg.fonttype": "none", "font.size": 9})
    plots = {}

    fig, axes = plt.subplots(1, 4, figsize=(12, 2.6))
    for ax, name in zip(axes, ("loss", "fvu", "l0", "dead_fraction")):
        steps, values = _read_curve(curves_dir / f"{name}.tsv")
        ax.plot(steps, values, lw=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name in ("loss", "fvu") and min(values) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    plots["curves"] = svg_text(fig)

    usage = curves_dir / "usage_histogram.tsv"
    if usage.exists():  # latents per decade of firing frequency, per logged step (a training batch)
        lines = [line.split("\t") for line in usage.read_text().splitlines()]
        header, rows = lines[0][1:], [[float(v) for v in row] for row in lines[1:]]
        if rows:
            fig, ax = plt.subplots(figsize=(9, 2.6))
            steps = [row[0] for row in rows]
            ax.stackplot(steps, *[[row[1 + i] for row in rows] for i in range(len(header))], labels=header)
            ax.set_title("latents by firing frequency in the batch (training)")
            ax.set_xlabel("step")
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
            fig.tight_layout()
            plots["usage"] = svg_text(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
    counts = eval_tensors["l0_counts"].double()
    axes[0].bar(range(counts.numel()), counts.tolist(), width=1.0)
    axes[0].set_title("L0 per row (validation)")
    axes[0].set_xlabel("active latents")
    density = eval_tensors["feature_density"].double()
    alive = density[density > 0]
    dead = int((density == 0).sum())
    if alive.numel():
        axes[1].hist(alive.log10().tolist(), bins=50)
    axes[1].set_title(f"log10 feature density ({dead} dead not shown)")
    fig.tight_layout()
    plots["histograms"] = svg_text(fig)

    fig, ax = plt.subplots(figsize=(9, 2.6))
    r2 = eval_tensors["r2_per_dim"].double()
    lin = eval_tensors["linear_r2_per_dim"].double()
    order = torch.argsort(r2)
    ax.plot(r2[order].tolist(), label="dictionary", lw=1)
    ax.plot(lin[order].tolist(), label="linear baseline", lw=1)
    ax.set_title("R² per target dim (sorted by the dictionary's)")
    ax.set_xlabel("target dim (sorted)")
    ax.legend()
    fig.tight_layout()
    plots["r2"] = svg_text(fig)
    return plots


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def effects_text(effects: dict) -> str:
    """An EFFECTS dict (interventions.effects) as one line: its numbers, named."""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in effects.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def interventions_context(analysis: dict | None, n_ablations: int = 8) -> dict | None:
    """What the report shows of metrics/<id>/analysis.json: the spec's interventions, and the
    ablated features that moved the task most."""
    if not analysis:
        return None
    ablations = sorted(analysis.get("ablations") or [], key=lambda a: -effect_size(a["effects"]))[:n_ablations]
    edits = lambda i: "; ".join(f"{e['feature']} {e['op']} {_fmt(e['value'])}" for e in i["edits"]) or "-"  # noqa: E731
    return {"alive_fraction": analysis.get("alive_fraction"), "in_band": analysis.get("band", {}).get("count"),
            "n_ablated": len(analysis.get("ablations") or []), "skipped": analysis.get("interventions_skipped"),
            "ablations": [{"feature": a["feature"], "score": a["score"], "effects": effects_text(a["effects"])} for a in ablations],
            "interventions": [{"name": i["name"], "mode": i["mode"], "keep_error": i["keep_error"], "edits": edits(i),
                               "effects": effects_text(i["effects"])} for i in analysis.get("interventions") or []]}


def render_report(spec: ExperimentSpec, eval_metrics_path: Path, train_metrics_path: Path, eval_tensors_path: Path,
                  curves_dir: Path, subject_metrics_path: Path | None, out_dir: Path,
                  dashboard: dict | None = None, analysis_metrics_path: Path | None = None) -> list[Path]:
    """report.md, report.html and their plots in ``out_dir``; ``dashboard`` (what build_dashboard
    returned, or None when there is none) adds the link to features/index.html; the analysis
    metrics add the interventions and the most effective ablations."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
    from safetensors.torch import load_file

    metrics = read_json(eval_metrics_path)
    context = {
        "spec": spec,
        "spec_yaml": dump_spec_yaml(spec),
        "metrics": metrics,
        "train": read_json(train_metrics_path),
        "subject": read_json(subject_metrics_path) if subject_metrics_path and subject_metrics_path.exists() else None,
        "plots": make_plots(curves_dir, load_file(eval_tensors_path)),
        "dashboard": dashboard,
        "interventions": interventions_context(read_json(analysis_metrics_path) if analysis_metrics_path and
                                               analysis_metrics_path.exists() else None),
        "top_contexts": read_json(eval_tensors_path.parent / "top_contexts.json") if (eval_tensors_path.parent / "top_contexts.json").exists() else [],
    }
    written = []
    for name, svg in sorted(context["plots"].items()):  # the Markdown report links these files
        path = out_dir / f"{name}.svg"
        atomic_write_text(path, svg)
        written.append(path)
    for fmt in ("md", "html"):
        env = Environment(
            loader=PackageLoader("sae_clt.report", "templates"),
            undefined=StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=False),
            keep_trailing_newline=True,
        )
        env.filters["fmt"] = _fmt
        text = env.get_template(f"report.{fmt}.j2").render(**context)
        path = out_dir / f"report.{fmt}"
        atomic_write_text(path, text)
        written.append(path)
    return written
