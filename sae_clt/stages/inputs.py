"""The inputs of the stages that read a trained or to-be-trained dictionary's data: the
experiment's specs, its activation store (checked against the dataset spec) and normalisation,
and a check that the dictionary and a batch fit in memory."""

from __future__ import annotations

from pathlib import Path

from ..data.normalize import Normalization
from ..data.store import ActivationStore
from ..errors import SpecError
from ..spec.models import ExperimentSpec
from ..spec.project import resolve_experiment


def experiment_inputs(spec_path: Path):
    """(resolved specs, store, normalisation) of an experiment spec file."""
    resolved = resolve_experiment(spec_path)
    store = ActivationStore.open(resolved.paths.store_dir(resolved.dataset.id))
    exp, collect = resolved.experiment, resolved.dataset.collect
    store.check_matches(collect.hook_points, collect.dtype, collect.n_instances,
                        str(resolved.paths.dataset_spec(resolved.dataset.id).relative_to(resolved.paths.root)))
    store.check_hooks([exp.source_key, exp.target_key], str(spec_path))
    norm = Normalization.load(resolved.paths.norm_dir(resolved.dataset.id))
    return resolved, store, norm


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_fits_in_memory(spec: ExperimentSpec, store: ActivationStore, spec_path: Path, batch_size: int, batch_field: str) -> None:
    """Refuse, before anything is allocated, a dictionary and batch that cannot fit: weights, their
    gradients and Adam's two moments (16 bytes a parameter) plus one batch's latents (pre-activations
    and codes, float32)."""
    d_sae = spec.model.d_sae * spec.n_layers
    d_in, d_out = store.hook_dims[spec.source_key], store.hook_dims[spec.target_key]
    need = 16 * d_sae * (d_in + d_out) + 8 * batch_size * d_sae
    have = available_memory()
    if have is not None and need > have:
        raise SpecError(str(spec_path), [
            f"{spec_path}: model.d_sae: {spec.model.d_sae} latents{' per layer' if spec.n_layers > 1 else ''} on {d_in} -> {d_out} dims "
            f"with {batch_field} {batch_size} need about {need / 1e9:,.1f} GB of memory (weights, Adam state, one batch of "
            f"latents); {have / 1e9:,.1f} GB are available: lower model.d_sae or {batch_field}"])
