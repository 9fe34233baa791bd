"""Resumable training state: a checkpoint holds everything a killed run needs to continue to the
same weights, and is valid only for the exact inputs it was trained under."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data.normalize import Normalization
from ..data.store import ActivationStore
from ..dictionaries.dictionary import Dictionary
from ..io import read_json, save_safetensors, write_json
from ..provenance import code_digest
from ..spec.models import ExperimentSpec, spec_hash
from ..stages.table import stage
from .curves import CurveWriter

TRAIN_SECTIONS = list(stage("train").sections)  # what the dictionary depends on


def checkpoint_fingerprint(spec: ExperimentSpec, store: ActivationStore, norm: Normalization) -> str:
    """What a checkpoint was trained under, all of which must be unchanged to resume it: the
    experiment's training sections, the store (its manifest: shards and their checksums, the
    dataset spec's subject and collect sections), the normalisation and split (the normalize
    section's result) and the code."""

    store_digest = hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec_hash(spec, TRAIN_SECTIONS)}:store-{store_digest}:norm-{norm.digest[:16]}:code-{code_digest()}"


class TrainState:
    """Everything a resumed run needs to continue exactly where a killed one stopped: weights,
    Adam moments, the dead-latent clock, the loader position and the curves so far."""

    FILE, META = "state.safetensors", "state.json"

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint  # spec hash of the training sections: a changed spec never resumes

    def save(self, model: Dictionary, opt: torch.optim.Optimizer, rows_since_fired: torch.Tensor, step: int,
             epoch: int, batch_in_epoch: int, curves: "CurveWriter", extra: dict[str, torch.Tensor] | None = None) -> None:
        # every tensor saved from the CPU (a checkpoint does not depend on the device it was saved on)
        tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()["state"]
        for idx, state in opt_state.items():
            for name, value in state.items():
                tensors[f"opt.{idx}.{name}"] = (value.detach().reshape(-1) if name == "step" else value.detach()).cpu()
        tensors["rows_since_fired"] = rows_since_fired.cpu()
        tensors.update({f"extra.{k}": v.cpu() for k, v in (extra or {}).items()})
        meta = {"fingerprint": self.fingerprint, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "curves": curves.rows}
        # The tensors carry their own step (one atomic file): a kill between this write and the
        # JSON's must not pair the new tensors with the previous checkpoint's step (resuming would
        # then replay steps the weights already hold). The JSON, for people and for the first
        # resume check, goes last.
        save_safetensors(self.folder / self.FILE, tensors, metadata={"checkpoint": json.dumps(meta)})
        write_json(self.folder / self.META, meta)

    def load(self, model: Dictionary, opt: torch.optim.Optimizer, rows_since_fired: torch.Tensor, curves: "CurveWriter"):
        """Restore into the given objects; returns (step, epoch, batch_in_epoch) or None."""
        from safetensors.torch import load_file

        meta_path, file = self.folder / self.META, self.folder / self.FILE
        if not meta_path.exists() or not file.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                own = (f.metadata() or {}).get("checkpoint")
            meta = json.loads(own) if own else read_json(meta_path)  # (checkpoints before the tensors carried it)
            tensors = load_file(file, device=str(rows_since_fired.device))  # onto the device training runs on
        except Exception:  # noqa: BLE001 - a damaged checkpoint is discarded, never trusted
            return None
        if meta.get("fingerprint") != self.fingerprint:
            return None
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state = opt.state_dict()
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state["state"].setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value
        opt.load_state_dict(state)
        rows_since_fired.copy_(tensors["rows_since_fired"])
        self.extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        curves.rows = {k: list(v) for k, v in meta["curves"].items()}
        return meta["step"], meta["epoch"], meta["batch_in_epoch"]

    def clear(self) -> None:
        for name in (self.META, self.FILE):
            (self.folder / name).unlink(missing_ok=True)
