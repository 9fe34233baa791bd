"""Any torch module as a subject: built by a factory named by import path, weights from a file.

The spec names ``package.module:callable`` (called with the spec's ``kwargs``) and a state dict
(safetensors, or a torch checkpoint read with ``weights_only=True``, never a pickle of code).
Inputs come from the dataset's tensor file: input ``i`` is row ``i`` of each named tensor, one
tensor per positional argument of ``forward``. A hook point's activation of shape
``[batch, ..., d]`` gives ``prod(...)`` rows per input (``position`` numbers them); one of shape
``[batch, d]`` gives one row per input, at position 0.
Causal check: cosine between each held-out input's clean and patched output.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

import torch

from ..data.hooks import module_hook_points
from ..errors import DataError, SpecError
from ..spec.models import TorchSubjectSpec
from .loaded import record_loaded_model
from .placement import OnDevice


def _resolve(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def build_module(spec: TorchSubjectSpec, root: Path) -> torch.nn.Module:
    module_name, _, attr = spec.factory.partition(":")
    for folder in reversed(spec.python_path):
        entry = str(_resolve(root, folder))
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(spec.id, [f"subject '{spec.id}': factory: cannot import module '{module_name}' ({exc}); "
                                  f"searched the python_path folders {spec.python_path} (relative to {root}) and the installed packages"]) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise SpecError(spec.id, [f"subject '{spec.id}': factory: module '{module_name}' has no attribute '{attr}'"])
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:
        raise SpecError(spec.id, [f"subject '{spec.id}': kwargs: {spec.factory} rejected them: {exc}"]) from None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(spec.id, [f"subject '{spec.id}': factory: {spec.factory} returned {type(model).__name__}, expected a torch.nn.Module"])
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DataError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unpickling error names the disallowed global
        raise DataError(f"{path}: cannot load with weights_only=True ({str(exc).splitlines()[0]}); save a plain state dict "
                        "(torch.save(model.state_dict(), ...)) or a .safetensors file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a common checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict (names -> tensors)")
    return state


def read_input_tensors(path: Path, keys: list[str]) -> list[torch.Tensor]:
    """The named tensors of a .safetensors file (memory-mapped), or the array of a .npy file."""
    if not path.exists():
        raise DataError(f"{path}: input tensor file not found")
    if path.suffix == ".npy":
        import numpy as np

        try:
            return [torch.from_numpy(np.load(path, allow_pickle=False))]
        except ValueError as exc:
            raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            wanted = keys or names
            if not keys and len(names) != 1:
                raise DataError(f"{path}: holds tensors {names}; name the ones forward() takes in collect.tensors.keys")
            missing = [k for k in wanted if k not in names]
            if missing:
                raise DataError(f"{path}: no tensor {missing[0]!r}; it holds {names}")
            tensors = [f.get_tensor(k) for k in wanted]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    lengths = {t.shape[0] if t.dim() else 0 for t in tensors}
    if len(lengths) != 1 or 0 in lengths:
        raise DataError(f"{path}: tensors {wanted} must share their first (input) dimension; shapes {[tuple(t.shape) for t in tensors]}")
    return tensors


class TorchSubject(OnDevice):
    kind = "torch"

    def __init__(self, spec: TorchSubjectSpec, model: torch.nn.Module, root: Path):
        self.spec, self.model, self.root = spec, model.eval(), root
        self.inputs: list[torch.Tensor] | None = None
        self._collected = 0
        self._clean = None

    @classmethod
    def load(cls, spec: TorchSubjectSpec, root: Path, with_weights: bool = True) -> "TorchSubject":
        model = build_module(spec, root)
        if spec.weights is not None and with_weights:
            path = _resolve(root, spec.weights)
            state = read_state_dict(path)
            own = model.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            wrong = [f"{k} {list(state[k].shape)} (model: {list(own[k].shape)})" for k in own
                     if k in state and state[k].shape != own[k].shape]
            if missing or unexpected or wrong:
                raise DataError(f"{path}: weights do not fit {spec.factory}({spec.kwargs}): missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
            model.load_state_dict(state)
        return cls(spec, model.float(), root)

    def hook_points(self) -> list[str]:
        return module_hook_points(self.model)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def configure(self, dataset) -> None:
        section = dataset.collect.tensors
        if section is None:
            raise SpecError(dataset.id, [f"dataset '{dataset.id}': collect.tensors: required for torch subjects "
                                         "(e.g. `tensors: {file: data/inputs.safetensors, keys: [x]}`)"])
        self.inputs = read_input_tensors(_resolve(self.root, section.file), section.keys)
        self._inputs_file = section.file

    def _n_available(self) -> int:
        return int(self.inputs[0].shape[0])

    def input_batches(self, n_instances: int, seed: int, batch_size: int):
        if n_instances > self._n_available():
            raise DataError(f"{self._inputs_file}: {self._n_available()} inputs, collect.n_instances asks for {n_instances}")
        for start in range(0, n_instances, batch_size):
            stop = min(start + batch_size, n_instances)
            # Provenance per input, complete for hook points giving one row per input ([batch, d]);
            # collect expands it to one row per position when a hook point gives [batch, ..., d].
            provenance = {"instance_id": torch.arange(start, stop), "position": torch.zeros(stop - start, dtype=torch.int32)}
            yield tuple(t[start:stop].float() if t.is_floating_point() else t[start:stop] for t in self.inputs), provenance, None

    def forward(self, inputs: tuple) -> torch.Tensor:
        out = self.model(*self.on_device(inputs))
        return out[0] if isinstance(out, (tuple, list)) else out

    def describe_row(self, instance_id: int, position: int) -> str:
        return f"input {instance_id}, position {position}"

    def _task_outputs(self) -> torch.Tensor:
        """The held-out inputs' outputs [n, prod(out dims)], under whatever patches are active."""
        start, n = self._collected, self.spec.evaluate.n_inputs
        if start + n > self._n_available():
            raise DataError(f"{self._inputs_file}: the causal check needs {n} inputs after the {start} collected ones, "
                            f"the file has {self._n_available()}; lower subject evaluate.n_inputs or collect.n_instances, "
                            "or set the experiment's evaluate.causal: false")
        outs = []
        for s in range(start, start + n, 256):
            batch = tuple(t[s:min(s + 256, start + n)] for t in self.inputs)
            batch = tuple(t.float() if t.is_floating_point() else t for t in batch)
            outs.append(self.forward(batch).reshape(len(batch[0]), -1).float())
        return torch.cat(outs)

    @torch.no_grad()
    def task_metric(self) -> dict:
        """Cosine between each held-out input's output and its clean output (1.0 when clean)."""
        out = self._task_outputs()
        if self._clean is None:  # the first call runs with no patch: it is the reference
            self._clean = out
        return {"output_cosine": float(torch.nn.functional.cosine_similarity(out, self._clean, dim=-1).mean())}

    @torch.no_grad()
    def task_reference(self) -> dict:
        """The held-out inputs' clean outputs (run with nothing patched), for ``task_effects``."""
        return {"outputs": self._task_outputs()}

    @torch.no_grad()
    def task_effects(self, reference: dict) -> dict:
        """Mean cosine of each held-out output with its clean one, under whatever patches are
        active: the value, the clean run's own (1 up to float error) and the change."""
        clean = reference["outputs"]
        cos = float(torch.nn.functional.cosine_similarity(self._task_outputs(), clean, dim=-1).mean())
        own = float(torch.nn.functional.cosine_similarity(clean, clean, dim=-1).mean())
        return {"output_cosine": cos, "output_cosine_clean": own, "output_cosine_change": cos - own}

    def prepare_task(self, dataset) -> None:
        self.configure(dataset)
        self._collected = dataset.collect.n_instances
        self._clean = None


def prepare_subject(spec: TorchSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    """Stage `subject` for a torch module: build it, load its weights, record what was loaded."""
    subject = TorchSubject.load(spec, root)
    return record_loaded_model(spec, subject, {"kind": "torch", "factory": spec.factory}, out_dir, metrics_path, log)


# The subject-kind interface (spec.SUBJECT_KINDS)


def load(spec: TorchSubjectSpec, subject_dir: Path, root: Path) -> TorchSubject:
    return TorchSubject.load(spec, root)


def architecture(spec: TorchSubjectSpec, root: Path) -> TorchSubject:
    return TorchSubject.load(spec, root, with_weights=False)


def prepare(spec: TorchSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    return prepare_subject(spec, root, out_dir, metrics_path, log=log)
