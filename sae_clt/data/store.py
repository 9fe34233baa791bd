"""The activation store: sharded safetensors + manifest.json, written once, read many times.

Layout of a store folder::

    manifest.json           schema, hook points and dims, dtype, shards (rows, xxh3_128 checksum),
                            subject fingerprint, seed, provenance fields, per-hook stats
    shard_00000.safetensors one tensor per hook point [rows, dim] (rows aligned across hook
                            points) + provenance tensors (instance_id, position)

Rows are shuffled within each shard at write time and again at read time. Shards are read one
at a time through safetensors' memory map, so memory does not grow with the store's size.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import DataError
from ..io import read_json, remove_own_folder, save_safetensors, write_json
from ..kernels.ops import store_rows
from .hook_groups import GroupDict, HookGroup
from .hook_names import matches

if TYPE_CHECKING:
    from ..kernels.ops import StoredRows

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
POINTER = "location.json"  # a local stand-in for a store kept elsewhere ($ACTIVATIONS_ROOT)
PROGRESS = "collect_progress.safetensors"  # present only while a collection is unfinished
RAW_STATS = "part_stats.safetensors"  # a worker part's running sums, for merging
PROVENANCE_FIELDS = ("instance_id", "position")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORE_FILE = re.compile(rf"^(shard_\d{{5}}\.safetensors|{re.escape(MANIFEST)}|{re.escape(POINTER)}|{re.escape(PROGRESS)}|{re.escape(RAW_STATS)})$")
_PART_DIR = re.compile(r"^part-\d+-of-\d+$")


def store_owned(rel: Path) -> bool:
    """Whether ``rel`` (relative to a store folder) is a file or folder saeclt writes in a store:
    shards, the manifest, the progress and pointer files, worker parts and their files."""
    parts = Path(rel).parts
    if len(parts) == 1:
        return bool(_STORE_FILE.match(parts[0]) or _PART_DIR.match(parts[0]))
    return len(parts) == 2 and bool(_PART_DIR.match(parts[0]) and _STORE_FILE.match(parts[1]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


CHECKSUM = "xxh3_128"  # the manifest field of a shard's checksum; stores written before it carry "sha256"


def shard_checksum(path: Path) -> str:
    """XXH3-128 of a shard file: a checksum against damage (not against forgery), ten times as fast
    as SHA-256 here (13 GB/s against 1.2), so checking a store on first read costs little. The
    file is hashed through a memory map: the pages the loader maps anyway, not a copy (reading
    it into Python took four times as long as hashing it)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return xxhash.xxh3_128_hexdigest(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as pages:
            return xxhash.xxh3_128_hexdigest(pages)


def checksum_field(shard: dict) -> str:
    """Which checksum a manifest's shard entry carries."""
    return CHECKSUM if CHECKSUM in shard else "sha256"


def shard_intact(path: Path, shard: dict) -> bool:
    field = checksum_field(shard)
    return (shard_checksum if field == CHECKSUM else sha256_file)(path) == shard[field]


class RunningStats:
    """Per-dim mean / variance and mean row norm, accumulated in float64."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sumsq = torch.zeros(dim, dtype=torch.float64)
        self.norm_sum = 0.0
        self.zeros = 0

    def update(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Add the rows ``rows`` of ``x`` (all of them when None)."""

        self.add(store_rows([x.float().contiguous()], rows, None), x.shape[0] if rows is None else rows.numel())

    def add(self, stored: "StoredRows", n_rows: int) -> None:
        """Add the statistics ``kernels.store_rows`` computed over ``n_rows`` rows."""
        self.n += n_rows
        self.sum += stored.col_sum
        self.sumsq += stored.col_sumsq
        self.norm_sum += stored.norm_sum
        self.zeros += stored.zeros

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.n, 1) - self.mean**2).clamp_min(0)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"n": self.n, "norm_sum": self.norm_sum, "zeros": self.zeros}, {"sum": self.sum, "sumsq": self.sumsq}

    def restore(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.n, self.norm_sum, self.zeros = scalars["n"], scalars["norm_sum"], scalars["zeros"]
        self.sum, self.sumsq = tensors["sum"].clone(), tensors["sumsq"].clone()

    def merge(self, other: "RunningStats") -> None:
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.norm_sum += other.norm_sum
        self.zeros += other.zeros

    @staticmethod
    def load_raw(folder: Path) -> dict[str, "RunningStats"]:
        """The raw sums a worker part kept beside its manifest (for merging)."""

        from safetensors import safe_open

        out = {}
        with safe_open(str(Path(folder) / RAW_STATS), framework="pt") as f:
            scalars = json.loads(f.metadata()["scalars"])
            for hook, values in scalars.items():
                stats = RunningStats(f.get_tensor(f"{hook}.sum").numel())
                stats.restore(values, {"sum": f.get_tensor(f"{hook}.sum"), "sumsq": f.get_tensor(f"{hook}.sumsq")})
                out[hook] = stats
        return out

    def summary(self) -> dict:
        std = self.var.sqrt()
        return {
            "rows": self.n,
            "mean_norm": self.norm_sum / max(self.n, 1),
            "centered_rms_norm": float(self.var.sum().sqrt()),
            "std_min": float(std.min()),
            "std_median": float(std.median()),
            "std_max": float(std.max()),
            "frac_zeros": self.zeros / max(self.n * self.sum.numel(), 1),
        }


class StoreWriter:
    """Writes shards atomically and the manifest last, so a store with a manifest is complete.

    A shard's file is written, flushed and hashed on a background thread (the file system and
    SHA-256 release the GIL) while the caller runs the next batches: on a 2-core machine this
    was 3-5 % of collecting MiniLM. One shard is in flight at most; the progress file that
    lists a shard is written after it, on the same thread. A failure is raised by the next
    ``write_shard``, ``save_progress``, ``wait`` or ``finish``; nothing is written after it."""

    def __init__(self, folder: Path, hook_dims: dict[str, int], dtype: str, meta: dict, drop_nonfinite: bool = False):
        self.folder = Path(folder)
        self.drop_nonfinite = drop_nonfinite
        self.dropped_rows = 0
        self.hook_dims = dict(hook_dims)
        self.dtype = dtype
        self.meta = meta
        self.shards: list[dict] = []
        self.stats = {name: RunningStats(dim) for name, dim in hook_dims.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # the store is incomplete until finish()
        self._io: ThreadPoolExecutor | None = None
        self._jobs: list[Future] = []
        self._failure: BaseException | None = None

    def _in_background(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the writer's thread after the jobs handed over before it; skipped once
        one of those failed."""
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="saeclt-store-writer")

        def guarded() -> None:
            if self._failure is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
                    self._failure = exc

        self._jobs.append(self._io.submit(guarded))

    def wait(self) -> None:
        """Return once every shard handed over is on disk; raise the failure of one that is not."""
        for job in self._jobs:
            job.result()
        self._jobs.clear()
        if self._failure is not None:
            raise self._failure

    def write_shard(self, acts: dict[str, torch.Tensor | list[torch.Tensor]], provenance: dict[str, torch.Tensor],
                    perm: torch.Tensor) -> None:
        """Write rows ``perm`` of each hook's activations (a tensor, or a list of parts to be read
        as their row-wise concatenation) and of the provenance as the next shard."""

        self.wait()  # the previous shard is on disk (and listed) before this one is numbered
        index = len(self.shards)
        name = f"shard_{index:05d}.safetensors"
        missing = [f for f in PROVENANCE_FIELDS if f not in provenance]
        if missing:
            raise DataError(f"{self.folder / name}: the subject gave no '{missing[0]}' per row (needed: {', '.join(PROVENANCE_FIELDS)}); "
                            "nothing of this shard was written")
        parts = {hook: [x.float().contiguous() for x in (xs if isinstance(xs, (list, tuple)) else [xs])]
                 for hook, xs in acts.items()}
        # One pass per hook converts, gathers the statistics and looks for NaN/inf; only a shard
        # that has such rows goes through the row-by-row check below and a second pass.
        stored = {hook: store_rows(xs, perm, DTYPES[self.dtype]) for hook, xs in parts.items()}
        if any(s.nonfinite_rows for s in stored.values()):
            finite = torch.ones(perm.numel(), dtype=torch.bool)
            for hook, xs in parts.items():
                bad = ~torch.isfinite(torch.cat(xs)).all(dim=1)
                if bad.any() and not self.drop_nonfinite:
                    row = int(bad.nonzero()[0])
                    raise DataError(f"{self.folder / name}: hook '{hook}' has NaN or inf in row {row} "
                                    f"(instance {int(provenance['instance_id'][row])}, position {int(provenance['position'][row])}); "
                                    f"shards before {name} were kept; set collect.drop_nonfinite: true to drop such rows")
                finite &= ~bad
            self.dropped_rows += int((~finite).sum())  # drop_nonfinite: keep the finite rows, count the others
            perm = perm[finite[perm]]
            stored = {hook: store_rows(xs, perm, DTYPES[self.dtype]) for hook, xs in parts.items()}
        for hook, s in stored.items():
            self.stats[hook].add(s, perm.numel())
        tensors = {hook: s.out for hook, s in stored.items()}
        tensors.update({k: v[perm] for k, v in provenance.items()})
        rows = int(perm.numel())

        def write() -> None:
            try:
                save_safetensors(self.folder / name, tensors)
            except OSError as exc:
                raise DataError(f"{self.folder / name}: cannot write shard ({exc.strerror or exc}); shards before it were kept, "
                                "the store has no manifest and will be recollected") from None
            self.shards.append({"file": name, "rows": rows, CHECKSUM: shard_checksum(self.folder / name)})

        self._in_background(write)

    # A collection in progress is resumable: after each shard, the writer's state (shards so far,
    # running stats, dropped rows) is saved with the caller's own state in one atomic file.

    def save_progress(self, caller: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Record the state after the last shard handed over; written once that shard is on disk."""

        if self._failure is not None:
            raise self._failure
        state = {"dropped_rows": self.dropped_rows, "caller": caller, "stats": {}}
        payload = dict(tensors)
        for hook, stats in self.stats.items():  # copied now: the next shard adds to them
            scalars, arrays = stats.state()
            state["stats"][hook] = scalars
            payload.update({f"stats.{hook}.{k}": v.clone() for k, v in arrays.items()})

        def write() -> None:  # runs after the shard's own job: the shard list is complete
            save_safetensors(self.folder / PROGRESS, payload, metadata={"state": json.dumps({**state, "shards": self.shards})})

        self._in_background(write)

    def restore_progress(self, state: dict, tensors: dict[str, torch.Tensor]) -> bool:
        """Continue from a saved state (see ``read_progress``) if every shard it lists is intact;
        shards written after it are deleted. False when there is nothing valid to resume."""
        listed = {s["file"] for s in state["shards"]}
        for shard in state["shards"]:
            file = self.folder / shard["file"]
            if not file.exists() or not shard_intact(file, shard):
                return False
        for extra in self.folder.glob("shard_*.safetensors"):
            if extra.name not in listed:
                extra.unlink()  # written after the last saved state: it will be written again
        self.shards, self.dropped_rows = state["shards"], state["dropped_rows"]
        for hook, stats in self.stats.items():
            stats.restore(state["stats"][hook], {k: tensors[f"stats.{hook}.{k}"] for k in ("sum", "sumsq")})
        return True

    def finish(self, keep_raw_stats: bool = False) -> dict:
        """Write the manifest (the store is complete from here on) and drop the progress file.
        ``keep_raw_stats``: also keep the running sums (a worker part, to be merged)."""
        self.wait()
        if self._io is not None:
            self._io.shutdown()
            self._io = None
        if keep_raw_stats:
            tensors, scalars = {}, {}
            for hook, stats in self.stats.items():
                scalars[hook], arrays = stats.state()
                tensors.update({f"{hook}.{k}": v for k, v in arrays.items()})
            save_safetensors(self.folder / RAW_STATS, tensors, metadata={"scalars": json.dumps(scalars)})
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "hook_points": self.hook_dims,
            "dtype": self.dtype,
            "n_rows": sum(s["rows"] for s in self.shards),
            "shards": self.shards,
            "provenance_fields": list(PROVENANCE_FIELDS),
            "dropped_nonfinite_rows": self.dropped_rows,
            "stats": {hook: s.summary() for hook, s in self.stats.items()},
            **self.meta,
        }
        write_json(self.folder / MANIFEST, manifest)
        (self.folder / PROGRESS).unlink(missing_ok=True)
        return manifest


def read_progress(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The saved state of an unfinished collection in ``folder`` (JSON state, tensors), or
    None when there is none or it is damaged (the collection then starts over)."""

    from safetensors import safe_open

    try:
        with safe_open(str(Path(folder) / PROGRESS), framework="pt") as f:
            return json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - no progress file, or a damaged one
        return None


def write_pointer(local: Path, external: Path) -> None:
    """The local store folder of a store kept elsewhere: its location and a copy of its
    manifest, so DVC sees the store change (the manifest lists every shard's checksum)."""

    remove_own_folder(local, store_owned, "an activation store (or its pointer)")
    local.mkdir(parents=True)
    write_json(local / POINTER, {"path": str(external)})
    (local / MANIFEST).write_bytes((external / MANIFEST).read_bytes())


class _ShardEntry(BaseModel):
    file: str = Field(pattern=r"^shard_\d{5}\.safetensors$")  # a plain name: cannot point outside the store
    rows: int = Field(ge=0)
    xxh3_128: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # stores written before xxh3_128

    @model_validator(mode="after")
    def _has_checksum(self):
        if self.xxh3_128 is None and self.sha256 is None:
            raise ValueError("no checksum (xxh3_128)")
        return self


class _Manifest(BaseModel):
    """The fields readers rely on; anything else in the manifest is carried along unchecked."""

    model_config = ConfigDict(extra="allow")
    schema_version: int
    hook_points: dict[str, int]
    dtype: Literal["float32", "float16", "bfloat16"]
    n_rows: int = Field(ge=0)
    n_instances: int = Field(ge=0)
    shards: list[_ShardEntry]


@dataclass
class ActivationStore:
    """A complete store, opened for reading. Its layout (every shard's tensors, shapes, dtypes
    and instance ids) is checked against the manifest when it is opened; each shard's SHA-256 and
    the finiteness of its values are checked the first time this process reads it, so a damaged
    shard is reported (naming it) before a single row of it is trained or evaluated on."""

    folder: Path
    manifest: dict
    checked: set[int] = field(default_factory=set)  # shards whose checksum was checked in this process
    _finite: set[tuple[int, str]] = field(default_factory=set, repr=False)  # (shard, hook point) found finite
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, folder: Path) -> "ActivationStore":
        folder = Path(folder)
        if (folder / POINTER).exists():  # collected under $ACTIVATIONS_ROOT
            local_manifest = (folder / MANIFEST).read_bytes() if (folder / MANIFEST).exists() else None
            try:
                folder = Path(read_json(folder / POINTER)["path"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{folder / POINTER}: damaged store pointer; recollect the store") from None
            if not (folder / MANIFEST).exists() or (folder / MANIFEST).read_bytes() != local_manifest:
                raise DataError(f"{folder}: the store this project points to is missing or was changed since it was collected; "
                                "recollect it (saeclt run / dvc repro) with $ACTIVATIONS_ROOT set as before")
        path = folder / MANIFEST
        if not path.exists():
            raise DataError(f"{folder}: no activation store here ({MANIFEST} missing; the collect stage has not finished)")
        try:
            manifest = read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
            version = manifest.get("schema_version") if isinstance(manifest, dict) else None
            raise DataError(f"{path}: schema_version {version!r}, this saeclt reads {SCHEMA_VERSION}")
        try:
            _Manifest.model_validate(manifest)
        except ValidationError as exc:
            err = exc.errors()[0]
            field_name = ".".join(str(p) for p in err["loc"])
            raise DataError(f"{path}: {field_name}: {err['msg']} (the manifest is damaged; recollect the store)") from None
        store = cls(folder, manifest)
        store.check_layout()
        return store

    def check_layout(self) -> None:
        """Every shard holds each hook point as [rows, dim] in the manifest's dtype and the
        provenance as [rows], with instance ids within [0, n_instances): read from the shards'
        headers and their instance ids only (cheap), so a damaged store fails here, not steps
        into training."""
        from safetensors import SafetensorError, safe_open

        m = self.manifest
        want_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[m["dtype"]]
        n_instances = m["n_instances"]
        provenance = list(dict.fromkeys([*PROVENANCE_FIELDS, *m.get("provenance_fields", [])]))
        for i, shard in enumerate(m["shards"]):
            path, rows = self.folder / shard["file"], shard["rows"]
            where = f"{path} (shard {i} of {self.folder / MANIFEST})"
            if not path.is_file():
                raise DataError(f"{where}: shard listed in the manifest is missing; recollect the store")
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    for name in [*m["hook_points"], *provenance]:
                        if name not in keys:
                            raise DataError(f"{where}: has no tensor '{name}' (the manifest lists it); recollect the store")
                    for hook, dim in m["hook_points"].items():
                        t = f.get_slice(hook)
                        if list(t.get_shape()) != [rows, dim] or t.get_dtype() != want_dtype:
                            raise DataError(f"{where}: tensor '{hook}' is {t.get_dtype()} {list(t.get_shape())}; the manifest says "
                                            f"{want_dtype} [{rows}, {dim}] (hook_points.{hook}, shards[{i}].rows); recollect the store")
                    for name in provenance:
                        shape = list(f.get_slice(name).get_shape())
                        if shape != [rows]:
                            raise DataError(f"{where}: tensor '{name}' has shape {shape}; the manifest says [{rows}] "
                                            f"(shards[{i}].rows); recollect the store")
                    ids = f.get_tensor("instance_id")
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise DataError(f"{where}: cannot read shard ({exc}); it may be truncated or corrupted; recollect the store") from None
            if ids.is_floating_point() or (rows and (int(ids.min()) < 0 or int(ids.max()) >= n_instances)):
                bad = ids.dtype if ids.is_floating_point() else f"from {int(ids.min())} to {int(ids.max())}"
                raise DataError(f"{where}: instance_id runs {bad}; the manifest's n_instances is {n_instances}, so ids must be "
                                f"integers in [0, {n_instances}); recollect the store")

    def check_shard(self, index: int, names: list[str] | None = None) -> None:
        """The shard's SHA-256 against the manifest (once per process), and the values of the hook
        points in ``names`` (every one when None) finite (once per hook point): what is read is
        what was collected. The finiteness test is one float sum per tensor (NaN and inf
        propagate; finite values cannot overflow it), a third of ``isfinite``'s cost."""
        hooks = [h for h in (names if names is not None else self.manifest["hook_points"]) if h in self.manifest["hook_points"]]
        with self._lock:
            hashed = index in self.checked
            todo = [h for h in hooks if (index, h) not in self._finite]
        if hashed and not todo:
            return
        shard = self.manifest["shards"][index]
        path = self.folder / shard["file"]
        if not hashed:
            if not path.exists():
                raise DataError(f"{path}: shard listed in the manifest is missing; recollect the store")
            if not shard_intact(path, shard):
                raise DataError(f"{path}: checksum does not match {self.folder / MANIFEST} (shards[{index}].{checksum_field(shard)}): the shard is "
                                "truncated, corrupted or not the one collected there; recollect the store (saeclt run / dvc repro)")
        for hook, x in (self._read(index, todo, as_stored=True) if todo else {}).items():
            total = x.sum(dtype=torch.float32 if x.dtype == torch.float16 else torch.float64)
            if not bool(torch.isfinite(total)):
                row = int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
                raise DataError(f"{path}: hook point '{hook}' has NaN or inf in row {row}; the store is damaged: recollect it")
        with self._lock:
            self.checked.add(index)
            self._finite.update((index, h) for h in todo)

    def assume_checked(self) -> None:
        """Treat every shard as checked (benchmarks that measure what the checks cost)."""
        with self._lock:
            self.checked.update(range(self.n_shards))
            self._finite.update((i, h) for i in range(self.n_shards) for h in self.manifest["hook_points"])

    @property
    def hook_dims(self) -> dict[str, int]:
        return GroupDict(self.manifest["hook_points"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def check_hooks(self, names: list[str], where: str) -> None:
        for name in [m for n in names for m in HookGroup(n).members]:
            if name not in self.hook_dims:
                raise DataError(f"{self.folder / MANIFEST}: hook point '{name}' (from {where}) is not in this store; "
                                f"it has: {', '.join(self.hook_dims)}")

    def check_matches(self, hook_points: list[str], dtype: str, n_instances: int, where: str) -> None:
        """Fail before training if the store on disk was collected under a different spec."""

        m, path = self.manifest, self.folder / MANIFEST
        stored = list(m["hook_points"])
        if not (all(any(matches(h, p) for p in hook_points) for h in stored)
                and all(any(matches(h, p) for h in stored) for p in hook_points)):
            raise DataError(f"{path}: hook points {sorted(m['hook_points'])} differ from {where} collect.hook_points "
                            f"{sorted(hook_points)}; the store is stale: recollect it (saeclt run / dvc repro)")
        if m["dtype"] != dtype:
            raise DataError(f"{path}: dtype {m['dtype']} differs from {where} collect.dtype {dtype}; recollect the store")
        if m["n_instances"] != n_instances:
            raise DataError(f"{path}: {m['n_instances']} instances, {where} collect.n_instances says {n_instances}; recollect the store")

    def verify(self) -> None:
        """Check every shard's checksum and values (see ``check_shard``)."""
        for index in range(self.n_shards):
            self.check_shard(index)

    def read_shard(self, index: int, names: list[str], as_stored: bool = False, check: bool = True) -> dict[str, torch.Tensor]:
        """Tensors of one shard (hook points as float32 unless ``as_stored``, provenance as stored).
        The shard is checked (``check_shard``) on its first read unless ``check`` is false (for
        reads that only count rows: the rows themselves are checked before they are used)."""
        if check:
            self.check_shard(index, names)
        return self._read(index, names, as_stored)

    def _read(self, index: int, names: list[str], as_stored: bool) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        shard = self.manifest["shards"][index]
        path = self.folder / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                out = {}
                for name in names:
                    x = f.get_tensor(name)
                    out[name] = x.float() if x.is_floating_point() and not as_stored else x
        except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
            raise DataError(f"{path}: cannot read shard ({exc}); it may be truncated or corrupted") from None
        for name, x in out.items():
            if x.shape[0] != shard["rows"]:
                raise DataError(f"{path}: tensor '{name}' has {x.shape[0]} rows, the manifest says {shard['rows']}")
        return out
