"""The built-in TSP subject: train it (a stage), load it, feed it inputs, measure its task.

What the rest of saeclt needs from any subject (see ``sae_clt.subjects.base``):
``model`` (an nn.Module to hook), ``hook_points()``, ``input_batches()`` with per-row
provenance, ``forward()``, and ``task_metric()`` for causal checks.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from ..errors import DataError
from ..io import read_json, save_safetensors, write_json
from ..provenance import output_meta
from ..spec.models import TSPSubjectSpec
from .placement import OnDevice
from .tsp_policy import PolicyConfig, TSPPolicy
from .tsp_problem import (
    best_nn_two_opt_tours,
    nearest_neighbour_tours,
    random_instances,
    random_tours,
    tour_length,
    two_opt,
)
from .tsp_train import PolicyTrainConfig, train_policy

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def policy_config(spec: TSPSubjectSpec) -> PolicyConfig:
    return PolicyConfig(**spec.policy.model_dump())


def eval_instances(spec: TSPSubjectSpec) -> torch.Tensor:
    return random_instances(spec.evaluate.n_instances, spec.n_nodes, spec.evaluate.seed)


def baseline_lengths(coords: torch.Tensor, seed: int) -> dict[str, float]:
    """Mean tour lengths of the reference heuristics on ``coords``."""
    nn_tours = nearest_neighbour_tours(coords, 0)
    return {
        "random": float(tour_length(coords, random_tours(coords.shape[0], coords.shape[1], seed)).mean()),
        "nearest_neighbour": float(tour_length(coords, nn_tours).mean()),
        "nearest_neighbour_2opt": float(tour_length(coords, two_opt(coords, nn_tours)).mean()),
        "best_of_20_nn_2opt": float(tour_length(coords, best_nn_two_opt_tours(coords, coords.shape[1])).mean()),
    }


def train_subject(spec: TSPSubjectSpec, out_dir: Path, metrics_path: Path, log=print) -> dict:
    """Stage `subject`: train the policy, save weights + config, write its metrics JSON."""
    torch.manual_seed(spec.seed)
    train_cfg = PolicyTrainConfig(seed=spec.seed, n_nodes=spec.n_nodes, **spec.train.model_dump())
    started = time.perf_counter()

    def progress(row: dict) -> None:
        log(f"  step {row['step']:>5}/{train_cfg.steps}  loss {row['loss']:.3f}  {row['seconds']:.0f}s")

    policy, train_log = train_policy(policy_config(spec), train_cfg, progress=progress)
    seconds = time.perf_counter() - started

    coords = eval_instances(spec)
    policy_len = float(tour_length(coords, policy.greedy_tours(coords)).mean())
    lengths = {"policy_greedy": policy_len, **baseline_lengths(coords, spec.evaluate.seed + 1)}
    meta = output_meta(spec, spec.seed)
    save_safetensors(out_dir / WEIGHTS, policy.state_dict(), metadata={"spec_hash": meta["spec_hash"]})
    write_json(out_dir / CONFIG, {"kind": "tsp", "n_nodes": spec.n_nodes, "policy": policy_config(spec).to_dict(), "meta": meta})
    # Timings vary run to run: kept beside the subject's folder (a DVC output), not in it.
    write_json(out_dir.parent / f"{out_dir.name}.train_log.json", {"seconds": seconds, "log": train_log})
    metrics = {
        "mean_tour_length": lengths,
        "policy_gap_to_best_heuristic_pct": 100 * (policy_len / lengths["best_of_20_nn_2opt"] - 1),
        "n_eval_instances": spec.evaluate.n_instances,
        "n_nodes": spec.n_nodes,
        "meta": meta,
    }
    write_json(metrics_path, metrics)
    return metrics | {"train_seconds": seconds}


class TSPSubject(OnDevice):
    """A trained policy loaded for collection and patching."""

    kind = "tsp"

    def __init__(self, spec: TSPSubjectSpec, model: TSPPolicy):
        self.spec = spec
        self.model = model.eval()

    @classmethod
    def load(cls, spec: TSPSubjectSpec, subject_dir: Path) -> "TSPSubject":
        from safetensors.torch import load_file

        weights, config = subject_dir / WEIGHTS, subject_dir / CONFIG
        if not weights.exists() or not config.exists():
            raise DataError(f"subject '{spec.id}' is not trained yet: {weights} missing (run `saeclt stage subject {spec.id}`)")
        cfg = read_json(config)
        model = TSPPolicy(PolicyConfig(**cfg["policy"]))
        model.load_state_dict(load_file(weights))
        return cls(spec, model)

    @classmethod
    def architecture_only(cls, spec: TSPSubjectSpec) -> "TSPSubject":
        """An untrained instance, enough to list hook points during validation."""
        return cls(spec, TSPPolicy(policy_config(spec)))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def hook_points(self) -> list[str]:
        """Points whose activations are one row per city: encoder modules only."""
        names = ["encoder.embed"]
        for i in range(self.spec.policy.n_layers):
            base = f"encoder.layers.{i}"
            names += [base, f"{base}:input", f"{base}.norm_attn", f"{base}.mlp", f"{base}.mlp:input", f"{base}.norm_mlp"]
        return names

    def input_batches(self, n_instances: int, seed: int, batch_size: int):
        """Yield (inputs, provenance) with provenance rows (instance_id, position) in the order
        the activations' rows come out ([B, N, d] flattened row-major)."""
        coords = random_instances(n_instances, self.spec.n_nodes, seed)
        n = self.spec.n_nodes
        for start in range(0, n_instances, batch_size):
            batch = coords[start : start + batch_size]
            ids = torch.arange(start, start + batch.shape[0])
            provenance = {
                "instance_id": ids.repeat_interleave(n),
                "position": torch.arange(n, dtype=torch.int32).repeat(batch.shape[0]),
            }
            yield batch, provenance, None  # every row is kept

    def forward(self, inputs: torch.Tensor) -> None:
        self.model.encoder(self.on_device(inputs))

    @torch.no_grad()
    def task_metric(self) -> dict:
        """Mean greedy tour length on the held-out instances (under whatever patches are active)."""
        coords = self.on_device(eval_instances(self.spec))
        return {"mean_tour_length": float(tour_length(coords, self.model.greedy_tours(coords)).mean())}

    @torch.no_grad()
    def task_reference(self) -> dict:
        """The clean greedy tours on the held-out instances (run with nothing patched), for
        ``task_effects``."""
        coords = self.on_device(eval_instances(self.spec))
        tours = self.model.greedy_tours(coords)
        return {"coords": coords, "tours": tours, "lengths": tour_length(coords, tours)}

    @torch.no_grad()
    def task_effects(self, reference: dict) -> dict:
        """The greedy tours under whatever patches are active, against the clean ones: mean tour
        length (clean, now, % change) and the fraction of decisions (the city chosen at each step
        after the fixed start, compared position by position) that differ."""
        coords = reference["coords"]
        tours = self.model.greedy_tours(coords)
        length, clean = float(tour_length(coords, tours).mean()), float(reference["lengths"].mean())
        changed = (tours[:, 1:] != reference["tours"][:, 1:]).float().mean()
        return {"mean_tour_length": length, "mean_tour_length_clean": clean,
                "mean_tour_length_change_pct": 100.0 * (length / clean - 1.0), "decisions_changed": float(changed)}

    def describe_row(self, instance_id: int, position: int) -> str:
        return f"instance {instance_id}, city {position}"

    def configure(self, dataset) -> None:
        """TSP inputs are random instances drawn from the dataset's seed: nothing to set up."""

    def prepare_task(self, dataset) -> None:
        """The causal check uses the subject's own held-out instances."""


# The subject-kind interface (spec.SUBJECT_KINDS)


def load(spec: TSPSubjectSpec, subject_dir: Path, root: Path) -> TSPSubject:
    return TSPSubject.load(spec, subject_dir)


def architecture(spec: TSPSubjectSpec, root: Path) -> TSPSubject:
    return TSPSubject.architecture_only(spec)


def prepare(spec: TSPSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    return train_subject(spec, out_dir, metrics_path, log=log)
