"""Activations recorded elsewhere, as a subject with no model (written by `saeclt import-acts`).

Each tensor of the listed files is a hook point: a named ``[N, d]`` tensor in a .safetensors
file, or the ``[N, d]`` array of a .npy file named by the file's stem. All hook points share
their rows (row i of each is the same token). Rows are read through memory maps, a batch at a
time, so files larger than RAM import fine. There is no model to patch, so experiments on such
a dataset evaluate everything but the causal check.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.store import sha256_file
from ..errors import DataError, SpecError
from ..io import write_json
from ..provenance import output_meta
from ..spec.models import FilesSubjectSpec
from ..spec.project import Paths
from .placement import OnDevice


@dataclass
class _Source:
    path: Path
    name: str  # tensor name in the file (safetensors) or None-like for .npy
    shape: tuple[int, ...]


def scan_files(paths: list[Path]) -> dict[str, _Source]:
    """Hook point name -> where its tensor lives. Checks shapes: 2-D, aligned rows, unique names."""
    found: dict[str, _Source] = {}
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: activation file not found")
        if not path.is_file():
            raise DataError(f"{path}: not a file; name the activation files themselves")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DataError(f"{path}: not a plain numeric .npy array or not readable ({exc})") from None
            entries = {path.stem: _Source(path, path.stem, tuple(arr.shape))}
            if arr.dtype.kind != "f":
                raise DataError(f"{path}: dtype {arr.dtype}, expected floating-point activations")
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    entries = {k: _Source(path, k, tuple(f.get_slice(k).get_shape())) for k in f.keys()}
                    dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            except Exception as exc:  # noqa: BLE001 - damaged files raise several types
                raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
            bad = [k for k, d in dtypes.items() if not d.startswith(("F", "BF"))]
            if bad:
                raise DataError(f"{path}: tensor '{bad[0]}' has dtype {dtypes[bad[0]]}, expected floating-point activations")
        else:
            raise DataError(f"{path}: expected a .safetensors or .npy file")
        for name, src in entries.items():
            if name in found:
                raise DataError(f"{path}: tensor '{name}' also appears in {found[name].path}; hook point names must be unique")
            if len(src.shape) != 2 or src.shape[0] == 0 or src.shape[1] == 0:
                raise DataError(f"{path}: tensor '{name}' has shape {list(src.shape)}, expected [rows, dim]")
            found[name] = src
    rows = {name: s.shape[0] for name, s in found.items()}
    if len(set(rows.values())) > 1:
        raise DataError(f"activation files disagree on the number of rows (they must be aligned): {rows}")
    if not found:
        raise DataError(f"{paths[0]}: holds no tensors")
    return found


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it, spelled as given or with links followed."""
    spellings = {Path(os.path.abspath(path)), path.resolve()}
    folders = {Path(os.path.abspath(folder)), folder.resolve()}
    return any(f == p or f in p.parents for p in spellings for f in folders)


def check_outside_outputs(paths: list[Path], root: Path, dataset_ids: list[str], where: str, field: str) -> None:
    """Refuse activation files inside saeclt's own outputs: ``runs/`` (stores, normalisation,
    dictionaries) and the stores under $ACTIVATIONS_ROOT. Collect replaces those folders, so
    it would delete the very file it is about to read. ``where`` and ``field`` name the spec
    file (or command) and the field (or argument) listing the files."""

    guarded = [(root / "runs", "runs/, the project's outputs")]
    for did in dataset_ids:
        external = Paths(root).external_store_dir(did)
        if external is not None:
            guarded.append((external, f"$ACTIVATIONS_ROOT/{did}, the activation store of dataset '{did}'"))
    for i, path in enumerate(paths):
        for folder, what in guarded:
            if _inside(path, folder):
                raise SpecError(where, [f"{where}: {field}[{i}]: {path} lies inside {what}; saeclt deletes and rewrites "
                                        "what is there (a collection replaces its store), so the file could vanish before "
                                        "it is read. Move or copy it elsewhere (e.g. data/) and list that path"])


def _project_dataset_ids(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "specs" / "datasets").glob("*.yaml"))


def read_rows(src: _Source, start: int, stop: int) -> torch.Tensor:
    if src.path.suffix == ".npy":
        arr = np.load(src.path, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.array(arr[start:stop], dtype=np.float32))
    from safetensors import safe_open

    with safe_open(str(src.path), framework="pt") as f:
        return f.get_slice(src.name)[start:stop].float()


class FilesSubject(OnDevice):
    kind = "files"
    model = None

    def __init__(self, spec: FilesSubjectSpec, root: Path):
        self.spec, self.root = spec, root
        self.paths = [Path(p) if Path(p).is_absolute() else root / p for p in spec.files]
        self._spec_file = f"specs/subjects/{spec.id}.yaml"
        check_outside_outputs(self.paths, root, _project_dataset_ids(root), self._spec_file, "files")
        self.sources = scan_files(self.paths)

    @classmethod
    def load(cls, spec: FilesSubjectSpec, root: Path) -> "FilesSubject":
        return cls(spec, root)

    @property
    def n_rows(self) -> int:
        return next(iter(self.sources.values())).shape[0]

    @property
    def n_instances(self) -> int:
        return self.n_rows // self.spec.rows_per_instance

    def hook_points(self) -> list[str]:
        return list(self.sources)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in self.paths:
            h.update(sha256_file(path).encode())
        return h.hexdigest()[:16]

    def configure(self, dataset) -> None:
        check_outside_outputs(self.paths, self.root, [dataset.id], self._spec_file, "files")

    def prepare_task(self, dataset) -> None:
        pass

    def activation_batches(self, points: list[str], n_instances: int, seed: int, batch_size: int, skip: int = 0,
                           stop: int | None = None):
        """(activations [rows, d] per point, provenance, keep mask, inputs in the batch); the
        batches covering the first ``skip`` inputs (already collected) are passed over."""
        per = self.spec.rows_per_instance
        if n_instances > self.n_instances:
            raise DataError(f"{self.paths[0]}: {self.n_rows} rows = {self.n_instances} inputs of {per} rows; "
                            f"collect.n_instances asks for {n_instances}")
        end = stop
        for start in range(0, n_instances, batch_size):
            stop = min(start + batch_size, n_instances)
            if stop <= skip:
                continue
            if end is not None and start >= end:
                return
            acts = {p: read_rows(self.sources[p], start * per, stop * per) for p in points}
            provenance = {"instance_id": torch.arange(start, stop).repeat_interleave(per),
                          "position": torch.arange(per, dtype=torch.int32).repeat(stop - start)}
            yield acts, provenance, None, stop - start

    def describe_row(self, instance_id: int, position: int) -> str:
        return f"row {instance_id * self.spec.rows_per_instance + position}"


def prepare_subject(spec: FilesSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    """Stage `subject` for imported activations: check the files, record their checksums."""
    subject = FilesSubject.load(spec, root)
    meta = output_meta(spec, 0)
    info = {"kind": "files", "fingerprint": subject.fingerprint(), "rows": subject.n_rows,
            "hook_points": {name: s.shape[1] for name, s in subject.sources.items()}, "meta": meta}
    write_json(out_dir / "config.json", info)
    write_json(metrics_path, {"rows": subject.n_rows, "meta": meta})
    log(f"[subject] {spec.id}: {subject.n_rows:,} imported rows, hook points {', '.join(subject.sources)}")
    return info


# The subject-kind interface (spec.SUBJECT_KINDS)


def load(spec: FilesSubjectSpec, subject_dir: Path, root: Path) -> FilesSubject:
    return FilesSubject.load(spec, root)


def architecture(spec: FilesSubjectSpec, root: Path) -> FilesSubject:
    return FilesSubject.load(spec, root)


def prepare(spec: FilesSubjectSpec, root: Path, out_dir: Path, metrics_path: Path, log=print) -> dict:
    return prepare_subject(spec, root, out_dir, metrics_path, log=log)
