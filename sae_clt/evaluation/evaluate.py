"""Stage `evaluate`: reconstruction, sparsity and causal metrics on the validation split.

- Reconstruction (raw activation space, float64): FVU, MSE, cosine, R² per target dim.
- Sparsity: L0 and its histogram, feature density, dead / dense fractions, decoder redundancy.
- Baseline: the dense least-squares map source -> target (with bias) fitted on the training
  split; its FVU on the same validation rows.
- Causal (subject task): clean; target replaced by the dictionary's output; by the linear
  baseline's output; zero- and mean-ablated. Reported as values, % change over clean, and the
  fraction recovered = (ablated - patched) / (ablated - clean), also against the linear map.
  The metrics are the subject's ``task_metric()``: for causal LMs next-token cross-entropy,
  KL(clean ‖ patched) and top-1 agreement with the clean run (``kl_from_clean``, ``top1_agreement``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.loader import PairLoader
from ..data.normalize import Normalization
from ..data.store import ActivationStore
from ..dictionaries.dictionary import Dictionary
from ..interventions.splice import splicing
from ..io import save_safetensors, write_json
from ..progress import progress_bar
from ..provenance import output_meta
from ..spec.models import ExperimentSpec
from ..spec.project import EVAL_TENSORS
from .metrics import ReconstructionMeter, SparsityMeter, decoder_redundancy

EVAL_SECTIONS = ["dataset", "source", "target", "model", "train", "evaluate"]


class TopActivations:
    """The ``n`` largest activations of every latent over the evaluation rows, with the rows'
    provenance, kept as a running top-n (no per-row Python loop)."""

    def __init__(self, d_sae: int, n: int = 5, device: torch.device | str = "cpu"):
        self.n = n
        self.values = torch.full((n, d_sae), -1.0, device=device)
        self.instance = torch.zeros((n, d_sae), dtype=torch.long, device=device)
        self.position = torch.zeros((n, d_sae), dtype=torch.long, device=device)

    def update(self, z: torch.Tensor, instance_id: torch.Tensor, position: torch.Tensor) -> None:
        k = min(self.n, z.shape[0])
        values, rows = z.topk(k, dim=0)  # [k, d_sae]
        values = torch.cat([self.values, values])
        instance = torch.cat([self.instance, instance_id.to(rows.device).long()[rows]])
        pos = torch.cat([self.position, position.to(rows.device).long()[rows]])
        best, order = values.topk(self.n, dim=0)
        self.values, self.instance, self.position = best, instance.gather(0, order), pos.gather(0, order)

    def contexts(self, subject, n_features: int) -> list[dict]:
        """The ``n_features`` latents with the largest activations, each with its top rows
        described by the subject (text around the token, or the TSP instance and city)."""
        peak = self.values[0].cpu()
        features = [int(f) for f in peak.argsort(descending=True)[:n_features] if peak[f] > 0]
        out = []
        for f in features:
            rows = []
            for j in range(self.n):
                value = float(self.values[j, f])
                if value <= 0:
                    break
                inst, pos = int(self.instance[j, f]), int(self.position[j, f])
                where = subject.describe_row(inst, pos) if subject is not None and hasattr(subject, "describe_row") else f"input {inst}, position {pos}"
                rows.append({"activation": round(value, 5), "instance_id": inst, "position": pos, "context": where})
            out.append({"feature": f, "examples": rows})
        return out


def fit_linear_baseline(loader: PairLoader, rank: int | None = None, layers: int = 1) -> torch.Tensor:
    """Least squares [x, 1] @ W ≈ y on the loader's rows (normal equations in float64, a tiny
    ridge for rank-deficient sources). Returns W [d_in + 1, d_out].

    With ``rank`` (SAEs, where the full map is the identity), the baseline is instead the
    best rank-``rank`` linear reconstruction: projection onto the top principal components,
    a dense code with as many numbers per row as the dictionary's L0.

    With ``layers`` > 1 (a clt: sources and targets are that many equal blocks), target block j
    is fitted from source blocks 0..j only, the structure the dictionary itself has.
    """
    xtx = xty = None
    for x, y in loader.epoch(0):
        xb = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        xtx = xb.t() @ xb if xtx is None else xtx + xb.t() @ xb
        xty = xb.t() @ y.double() if xty is None else xty + xb.t() @ y.double()
    if rank is not None:
        n = xtx[-1, -1]
        mean = xtx[-1, :-1] / n
        cov = xtx[:-1, :-1] / n - torch.outer(mean, mean)
        _, vecs = torch.linalg.eigh(cov)
        top = vecs[:, -rank:]  # [d, rank]
        proj = top @ top.t()
        return torch.cat([proj, (mean - mean @ proj).unsqueeze(0)]).float()
    ridge = 1e-8 * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=torch.float64)
    if layers == 1:
        return torch.linalg.solve(xtx + ridge, xty).float()
    d_in, d_out = xtx.shape[0] - 1, xty.shape[1]
    w_in, w_out = d_in // layers, d_out // layers
    w = torch.zeros_like(xty)
    for j in range(layers):
        rows = torch.cat([torch.arange((j + 1) * w_in), torch.tensor([d_in])])  # sources 0..j and the bias
        cols = slice(j * w_out, (j + 1) * w_out)
        sub = (xtx + ridge)[rows][:, rows]
        w[rows, cols] = torch.linalg.solve(sub, xty[rows, cols])
    return w.float()


def apply_linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ w[:-1] + w[-1]


def _pct(value: float, reference: float) -> float | None:
    """Percent change; None when the reference is zero (e.g. a full-rank PCA baseline)."""
    return None if abs(reference) < 1e-12 else 100.0 * (value / reference - 1.0)


def _recovered(ablated: float, patched: float, clean: float) -> float | None:
    gap = ablated - clean
    return None if abs(gap) < 1e-12 else (ablated - patched) / gap


def causal_check(subject, model: Dictionary, w_lin: torch.Tensor, norm: Normalization, spec: ExperimentSpec) -> dict:
    """Run the subject's task clean and with its target hook point(s) replaced (the splice of
    ``interventions.splice``; a clt replaces every target layer at once, each computed from the
    sources recorded in the same, already patched, forward pass: the replacement model)."""
    source, target, layered = spec.source_key, spec.target_key, model.cfg.layout.layered

    def linear(x: torch.Tensor) -> torch.Tensor:
        return norm.invert(target, apply_linear(w_lin, norm.apply(source, x)))

    variants = {  # (raw source rows, the subject's target rows, the target's columns) -> new target rows
        "dictionary": lambda x, y, cols: model.predict_raw(x)[:, cols],
        "linear_baseline": lambda x, y, cols: linear(x)[:, cols],
        "zero_ablation": lambda x, y, cols: torch.zeros_like(y),
        "mean_ablation": lambda x, y, cols: norm.raw_mean[target][cols].to(y.dtype).expand_as(y).clone(),
    }
    clean = subject.task_metric()
    results = {"clean": clean}
    for name, rows in variants.items():
        with splicing(subject, spec, layered, model.cfg.d_in, model.cfg.d_out, rows):
            results[name] = subject.task_metric()
    out: dict = {}
    for metric, clean_value in clean.items():
        values = {name: r[metric] for name, r in results.items()}
        out[metric] = {
            "values": values,
            "pct_change_vs_clean": {n: _pct(v, clean_value) for n, v in values.items() if n != "clean"},
            "fraction_recovered": {
                "vs_zero_ablation": _recovered(values["zero_ablation"], values["dictionary"], clean_value),
                "vs_mean_ablation": _recovered(values["mean_ablation"], values["dictionary"], clean_value),
                "vs_linear_baseline": _recovered(values["linear_baseline"], values["dictionary"], clean_value),
            },
            **({"targets_replaced": list(target.members)} if layered else {}),
        }
    return out


@torch.no_grad()
def evaluate(spec: ExperimentSpec, store: ActivationStore, norm: Normalization, dictionary_dir: Path, subject,
             out_dir: Path, metrics_path: Path, device: torch.device | str = "cpu") -> dict:
    """The metrics of the module docstring, written to ``metrics_path`` (and the per-dim tensors and
    top contexts to ``out_dir``). The dictionary's passes run on ``device`` (the subject should be
    there too, for the causal check); the linear baseline is fitted on the CPU (float64 normal equations)."""
    cfg = spec.evaluate
    device = torch.device(device)
    model = Dictionary.load(dictionary_dir).to(device)
    source, target = spec.source_key, spec.target_key
    train_loader = PairLoader(store, norm, source, target, "train", cfg.batch_size, seed=0, shuffle=False)
    val_loader = PairLoader(store, norm, source, target, "val", cfg.batch_size, seed=0, shuffle=False)
    is_sae = model.cfg.layout.reconstructs_input
    baseline_rank = None
    if is_sae:  # a dense code with as many numbers per row as the dictionary's L0
        l0 = model.cfg.k
        if not model.cfg.act.exact_k:  # the measured L0 on the validation rows
            counts = [(model.encode(x.to(device)) > 0).sum(-1).float().cpu() for x, _ in val_loader.epoch(0)]
            l0 = round(float(torch.cat(counts).mean())) if counts else 1
        baseline_rank = max(1, min(l0, store.hook_dims[source]))
    w_lin = fit_linear_baseline(train_loader, rank=baseline_rank, layers=spec.n_layers).to(device)
    norm = norm.to(device)  # (the loaders keep the CPU copy: they normalise on the CPU)

    d_out = store.hook_dims[target]
    recon, linear = ReconstructionMeter(d_out, device), ReconstructionMeter(d_out, device)
    # clt: the reconstruction of each target layer too
    layers = target.members if model.cfg.layout.layered else []
    per_layer = {h: ReconstructionMeter(d_out // len(layers), device) for h in layers}
    sparsity = SparsityMeter(model.cfg.d_sae, device)
    top = TopActivations(model.cfg.d_sae, n=5, device=device)
    with progress_bar(val_loader.steps_per_epoch(), desc=f"evaluate {spec.id}", unit="batch") as bar:
        for x, y, instance_id, position in val_loader.epoch(0, with_provenance=True):
            x, y = x.to(device), y.to(device)
            y_hat, z = model(x)
            top.update(z, instance_id, position)
            y_raw = norm.invert(target, y)
            y_hat_raw = norm.invert(target, y_hat)
            recon.update(y_raw, y_hat_raw)
            for i, meter in enumerate(per_layer.values()):
                width = d_out // len(layers)
                meter.update(y_raw[:, i * width:(i + 1) * width], y_hat_raw[:, i * width:(i + 1) * width])
            linear.update(y_raw, norm.invert(target, apply_linear(w_lin, x)))
            sparsity.update(z)
            bar.update(1)

    density = sparsity.density()
    alive = density > 0
    metrics = {
        "reconstruction": recon.summary(),
        "sparsity": {**sparsity.summary(cfg.dense_threshold),
                     "decoder_redundancy_0.9": decoder_redundancy(model.W_dec.detach(), 0.9, alive)},
        "linear_baseline": {**linear.summary(),
                            "kind": f"top-{baseline_rank} principal components" if is_sae else
                            "least squares source -> target" if spec.n_layers == 1 else
                            "least squares, each target layer from its own and earlier source layers"},
        "fvu_vs_linear_pct": _pct(recon.summary()["fvu"], linear.summary()["fvu"]),
        "model": {"architecture": spec.model.architecture, "activation": spec.model.activation, "d_sae": spec.model.d_sae,
                  "k": spec.model.k, "d_in": store.hook_dims[source], "d_out": d_out, "source": source, "target": target},
    }
    if per_layer:
        metrics["reconstruction"]["per_target_layer"] = {h: m.summary()["fvu"] for h, m in per_layer.items()}
    if cfg.causal and getattr(subject, "model", None) is not None:
        metrics["causal"] = causal_check(subject, model, w_lin, norm, spec)
    elif cfg.causal:
        metrics["causal_skipped"] = "the dataset's activations were imported: there is no model to patch"
    metrics["meta"] = output_meta(spec, spec.train.seed, EVAL_SECTIONS, device)

    save_safetensors(out_dir / EVAL_TENSORS, {
        "r2_per_dim": recon.r2_per_dim().float().cpu(),
        "linear_r2_per_dim": linear.r2_per_dim().float().cpu(),
        "feature_density": density.float().cpu(),
        "l0_counts": torch.tensor([sparsity.l0_hist.get(i, 0) for i in range(max(sparsity.l0_hist, default=0) + 1)]),
        "linear_W": w_lin.cpu(),
    })
    write_json(out_dir / "top_contexts.json", top.contexts(subject, n_features=16))
    write_json(metrics_path, metrics)
    return metrics
