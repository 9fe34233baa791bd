"""``saeclt compare``: an experiment's trained dictionary beside dictionaries trained elsewhere
(SAELens or sparsify folders), on the same held-out rows, with the same metric definitions as the
evaluate stage (sae_clt/evaluation/metrics.py): FVU, MSE, cosine, L0, dead and dense fractions.

The external dictionaries take raw activations (as those tools train them); saeclt's own takes
the store's normalised rows. Every dictionary sees the same validation rows, read once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.loader import PairLoader
from ..dictionaries.dictionary import Dictionary
from ..errors import DataError
from ..evaluation.metrics import ReconstructionMeter, SparsityMeter
from ..io import write_json
from ..progress import progress_bar
from ..provenance import output_meta
from ..stages.inputs import experiment_inputs
from .formats import load_external


def compare_experiment(spec_path: Path, folders: list[Path], out_path: Path | None = None, max_rows: int | None = None) -> dict:
    """Metrics of the experiment's dictionary (if trained) and of each external folder on the
    experiment's validation rows; written to ``out_path`` (default runs/experiments/<id>/compare.json)."""

    if max_rows is not None and max_rows < 1:
        raise DataError(f"--max-rows: expected at least 1, got {max_rows}")
    resolved, store, norm = experiment_inputs(Path(spec_path))
    spec = resolved.experiment
    source, target = spec.source_key, spec.target_key
    d_in, d_out = store.hook_dims[source], store.hook_dims[target]
    entries: list[tuple[str, object, bool, dict]] = []  # (name, model, takes raw rows, description)
    own_dir = resolved.paths.dictionary_dir(spec.id)
    if (own_dir / "cfg.json").exists():
        own = Dictionary.load(own_dir)
        entries.append((f"saeclt:{spec.id}", own, False, {"format": "saeclt", "folder": str(own_dir), "architecture": own.cfg.architecture,
                                                           "activation": own.cfg.activation, "d_sae": own.cfg.d_sae, "k": own.cfg.k}))
    names, warnings = set(), []
    for folder in folders:
        model, description = load_external(Path(folder))
        if (description["d_in"], description["d_out"]) != (d_in, d_out):
            raise DataError(f"{folder}: reads {description['d_in']} and writes {description['d_out']} dims; experiment "
                            f"'{spec.id}' maps {source} ({d_in}) to {target} ({d_out})")
        if description["kind"] == "sae" and source != target:
            raise DataError(f"{folder}: an SAE (it reconstructs the point it reads); experiment '{spec.id}' is a transcoder "
                            f"from {source} to {target}")
        name = f"{description['format']}:{Path(folder).name}"
        named = description.get("hook_points")
        if named and tuple(named) != (source, target):  # other tools name hook points their own way: say so, compare by width
            warnings.append(f"{name}: its file names the hook points {named[0]} -> {named[1]}, the experiment {source} -> {target}")
        while name in names:
            name += "'"
        names.add(name)
        entries.append((name, model, True, description))
    if not entries:
        raise DataError(f"nothing to compare: experiment '{spec.id}' is not trained ({own_dir}) and no folders were given")

    loader = PairLoader(store, norm, source, target, "val", spec.evaluate.batch_size, seed=0, shuffle=False)
    recon = {name: ReconstructionMeter(d_out) for name, *_ in entries}
    sparsity = {name: SparsityMeter(model.cfg.d_sae) for name, model, *_ in entries}
    rows = 0
    with torch.no_grad(), progress_bar(loader.steps_per_epoch(), desc=f"compare {spec.id}", unit="batch") as bar:
        for x, y in loader.epoch(0):
            if max_rows is not None:
                if rows >= max_rows:
                    break
                x, y = x[:max_rows - rows], y[:max_rows - rows]
            x_raw, y_raw = norm.invert(source, x), norm.invert(target, y)
            for name, model, raw, _ in entries:
                if raw:
                    z = model.encode(x_raw)
                    y_hat = model.decode(z, x_raw)
                else:
                    y_hat, z = model(x)
                    y_hat = norm.invert(target, y_hat)
                recon[name].update(y_raw, y_hat)
                sparsity[name].update(z)
            rows += x.shape[0]
            bar.update(1)
    results = {name: {**description, "reconstruction": recon[name].summary(),
                      "sparsity": sparsity[name].summary(spec.evaluate.dense_threshold)}
               for name, _, _, description in entries}
    summary = {"experiment": spec.id, "source": source, "target": target, "rows": rows, "dictionaries": results, "warnings": warnings,
               "meta": output_meta(spec, 0, ["dataset", "source", "target"])}
    write_json(out_path or own_dir.parent / "compare.json", summary)
    return summary


def comparison_table(summary: dict) -> str:
    lines = [f"{summary['experiment']}: {summary['source']} -> {summary['target']}, {summary['rows']:,} validation rows",
             f"{'dictionary':<40}{'d_sae':>7}{'FVU':>9}{'cosine':>9}{'L0':>8}{'dead':>8}{'dense':>8}"]
    for name, r in summary["dictionaries"].items():
        rec, sp = r["reconstruction"], r["sparsity"]
        lines.append(f"{name:<40}{r['d_sae']:>7}{rec['fvu']:>9.4f}{rec['cosine']:>9.4f}{sp['l0']:>8.1f}"
                     f"{sp['dead_fraction']:>8.3f}{sp['dense_fraction']:>8.3f}")
    lines += [f"note: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)
