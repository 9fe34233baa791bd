"""Stage `collect`: run the subject over its inputs and record hook points into a store.

All hook points of a dataset are recorded in one forward pass per batch (forward hooks for
outputs, forward-pre hooks for inputs), so rows stay aligned across hook points; the pass stops
at the last hook point needed. Rows are shuffled within each shard before writing.

Resumable: after every shard the writer's state and the shuffling generator's state are saved
(atomically, in the store folder). A killed collection restarts after the last complete shard:
batches before it are passed over, shards written after it are discarded and written again,
so the finished store is the same, byte for byte, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import DataError
from ..io import check_own_folder, read_json, remove_own_folder
from ..progress import progress_bar
from ..provenance import output_meta
from ..spec.models import DatasetSpec, spec_hash
from ..stages.table import stage
from .hooks import StopForward, expand_hook_points, recording
from .staging import HostStaging
from .store import MANIFEST, PROGRESS, RunningStats, StoreWriter, read_progress, store_owned

STORE_ROLE = "an activation store"
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimated_store_bytes(n_rows: int, dims: dict[str, int], dtype: str) -> int:
    """Shard payload: activations plus 12 bytes of provenance per row (headers are negligible)."""
    return n_rows * (sum(dims.values()) * BYTES_PER_VALUE[dtype] + 12)


def check_free_disk(store_dir: Path, n_rows: int, dims: dict[str, int], dtype: str) -> None:
    need = estimated_store_bytes(n_rows, dims, dtype)
    existing = next(p for p in [store_dir, *store_dir.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if need * 1.05 > free:
        raise DataError(f"{store_dir}: the rows still to collect need about {need / 1e9:.2f} GB ({n_rows} rows x {sum(dims.values())} values, {dtype}); "
                        f"only {free / 1e9:.2f} GB are free there. Free space, store fewer rows, use float16, "
                        "or point $ACTIVATIONS_ROOT at a larger disk")


def check_activations_root(base: Path) -> None:
    """$ACTIVATIONS_ROOT must be a folder saeclt can create files in (checked by creating one)."""

    where = f"$ACTIVATIONS_ROOT ({base})"
    if base.exists() and not base.is_dir():
        raise DataError(f"{where}: is a file, not a folder; point ACTIVATIONS_ROOT at a folder on a disk with room for the store")
    try:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=base, prefix=".saeclt-probe-"):
            pass
    except OSError as exc:
        raise DataError(f"{where}: saeclt cannot create files there ({exc.strerror or exc}); point ACTIVATIONS_ROOT at a "
                        "writable folder on a disk with room for the store, or unset it to keep the store in runs/") from None


def within_norm_bound(acts: dict[str, torch.Tensor], keep: torch.Tensor, multiple: float) -> torch.Tensor:
    """Rows whose norm at every hook point is at most ``multiple`` x that hook's median norm
    over the kept rows of the batch (attention-sink tokens can be 100x the typical norm)."""
    ok = torch.ones_like(keep)
    for x in acts.values():
        norms = x.norm(dim=1)
        if keep.any():
            ok &= norms <= multiple * norms[keep].median()
    return ok


def recorded_batches(subject, points: list[str], available: list[str], n_instances: int, seed: int, batch_size: int,
                     skip: int = 0, stop: int | None = None):
    """Run a module subject batch by batch and yield (activations [rows, d] per hook point,
    provenance per row, keep mask or None, inputs in the batch). Batches wholly within the
    first ``skip`` inputs are generated but not run (a resumed collection); batches from input
    ``stop`` on are not run either (a worker's part).

    On a GPU the activations come back through pinned host buffers (``staging.HostStaging``): a
    batch's copies are queued and the next batch's forward pass runs before they are waited for,
    so each batch is yielded one forward pass late (same order, same rows)."""
    staging = HostStaging() if getattr(subject, "device", torch.device("cpu")).type == "cuda" else None
    late = None  # (host activations, provenance, keep, n_inputs, slot): queued, not yet yielded
    for item in _recorded(subject, points, available, n_instances, seed, batch_size, skip, stop):
        if staging is None:
            yield item
            continue
        acts, *rest = item
        host, slot = staging.copy(acts)
        if late is not None:
            staging.ready(late[-1])
            yield late[:-1]
        late = (host, *rest, slot)
    if late is not None:
        staging.ready(late[-1])
        yield late[:-1]


def _recorded(subject, points: list[str], available: list[str], n_instances: int, seed: int, batch_size: int,
              skip: int, stop: int | None):
    """``recorded_batches`` as computed, activations on the subject's device."""
    done = 0
    for inputs, provenance, keep in subject.input_batches(n_instances, seed, batch_size):
        if stop is not None and done >= stop:
            return
        n_inputs = int(provenance["instance_id"].unique().numel())
        done += n_inputs
        if done <= skip:
            continue
        with recording(subject.model, points, available, stop_after=True) as store:
            with contextlib.suppress(StopForward):
                subject.forward(inputs)
        missing = [p for p in points if p not in store]
        if missing:
            raise DataError(f"hook point '{missing[0]}' exists but did not run during the subject's forward pass")
        acts = {p: store[p].reshape(-1, store[p].shape[-1]).float() for p in points}
        rows = {p: x.shape[0] for p, x in acts.items()}
        if len(set(rows.values())) > 1:
            shapes = {p: list(store[p].shape) for p in points}
            raise DataError(f"hook points give different numbers of rows per input, so their rows cannot be aligned: {shapes}; "
                            "collect such points in separate datasets")
        n_rows = next(iter(rows.values()))
        odd = [p for p in points if store[p].shape[0] != n_inputs]
        if odd:
            raise DataError(f"hook point '{odd[0]}' gives shape {list(store[odd[0]].shape)}: its first axis is not the batch of "
                            f"{n_inputs} inputs; record a point whose activation is [batch, ..., d]")
        if provenance["instance_id"].numel() not in (n_rows, n_inputs):
            raise DataError(f"hook point '{points[0]}' gives {n_rows // n_inputs} row(s) per input (shape {list(store[points[0]].shape)}) "
                            f"but the subject records {provenance['instance_id'].numel() // n_inputs} per input (tokens); "
                            "collect token-level hook points, not pooled ones")
        if provenance["instance_id"].numel() != n_rows:  # per-input provenance: one row per position
            per = n_rows // n_inputs
            provenance = {"instance_id": provenance["instance_id"].repeat_interleave(per),
                          "position": torch.arange(per, dtype=torch.int32).repeat(n_inputs)}
        yield acts, provenance, keep, n_inputs


def progress_key(dataset: DatasetSpec, subject, points: list[str]) -> str:
    """What a saved collection state must match to be resumed."""
    return f"{spec_hash(dataset, list(stage('collect').sections))}:{subject.fingerprint()}:{','.join(points)}"


def part_range(n_instances: int, batch_size: int, part: tuple[int, int]) -> tuple[int, int]:
    """Inputs [lo, hi) of worker ``part = (i, n)``: a contiguous run of whole batches."""
    i, n = part
    n_batches = -(-n_instances // batch_size)
    lo, hi = i * n_batches // n, (i + 1) * n_batches // n
    return min(lo * batch_size, n_instances), min(hi * batch_size, n_instances)


def part_dir(store_dir: Path, part: tuple[int, int]) -> Path:
    return store_dir / f"part-{part[0]}-of-{part[1]}"


class _Collection:
    """One collection into one store folder: its writer, the batches waiting to fill a shard, the
    generator that shuffles rows within shards, and the resumable state saved after each shard."""

    def __init__(self, dataset: DatasetSpec, subject, store_dir: Path, key: str, lo: int, hi: int, part: tuple[int, int] | None):
        cfg = dataset.collect
        self.dataset, self.subject, self.folder, self.key, self.lo, self.hi, self.part = dataset, subject, store_dir, key, lo, hi, part
        self.gen = torch.Generator().manual_seed(cfg.seed if part is None else cfg.seed + 1_000_003 * (part[0] + 1))
        self.writer: StoreWriter | None = None
        self.pending_acts: dict[str, list[torch.Tensor]] = {}
        self.pending_prov: dict[str, list[torch.Tensor]] = {}
        self.pending_instances = 0
        self.done = lo  # inputs (absolute index) whose rows are in written shards

    def make_writer(self, dims: dict[str, int]) -> StoreWriter:
        cfg, subject = self.dataset.collect, self.subject
        meta = {
            "subject": {"id": subject.spec.id, "kind": subject.kind, "fingerprint": subject.fingerprint()},
            "n_instances": cfg.n_instances,
            "meta": output_meta(self.dataset, cfg.seed, list(stage("collect").sections), getattr(subject, "device", None)),
        }
        if getattr(subject, "input_fingerprint", None):
            meta["inputs"] = subject.input_fingerprint
        if self.part is not None:
            meta["part"] = {"index": self.part[0], "of": self.part[1], "inputs": [self.lo, self.hi], "key": self.key}
        return StoreWriter(self.folder, dims, cfg.dtype, meta, drop_nonfinite=cfg.drop_nonfinite)

    def start(self) -> int:
        """Resume an unfinished collection of the same key found in the folder (after its last
        complete shard), or clear the folder (only saeclt's own files are ever deleted); returns
        the first input still to collect."""
        check_own_folder(self.folder, store_owned, STORE_ROLE)  # before anything is read or written there
        if not ((self.folder / PROGRESS).exists() and not (self.folder / MANIFEST).exists()):
            remove_own_folder(self.folder, store_owned, STORE_ROLE)  # a fresh collection replaces an old one
            return self.lo
        saved = read_progress(self.folder)
        if saved is not None and saved[0]["caller"].get("key") == self.key:
            state, tensors = saved
            writer = self.make_writer(state["caller"]["dims"])
            if writer.restore_progress(state, tensors):
                self.writer = writer
                self.gen.set_state(tensors["rng_state"])
                self.done = state["caller"]["instances_done"]
                print(f"[collect] {self.dataset.id}: resuming after {len(writer.shards)} complete shard(s), "
                      f"{self.done - self.lo} of {self.hi - self.lo} inputs done", flush=True)
                return self.done
        remove_own_folder(self.folder, store_owned, STORE_ROLE)
        return self.lo

    def add(self, acts: dict[str, torch.Tensor], provenance: dict[str, torch.Tensor], keep: torch.Tensor, n_inputs: int,
            first: int) -> None:
        """Queue a batch's kept rows; a shard is written once enough inputs are queued."""
        cfg = self.dataset.collect
        if self.writer is None:
            dims = {p: int(x.shape[-1]) for p, x in acts.items()}
            check_free_disk(self.folder, (self.hi - first) * next(iter(acts.values())).shape[0] // n_inputs, dims, cfg.dtype)
            self.writer = self.make_writer(dims)
        for p, x in acts.items():
            self.pending_acts.setdefault(p, []).append(x[keep])
        for k, v in provenance.items():
            self.pending_prov.setdefault(k, []).append(v[keep])
        self.pending_instances += n_inputs
        if self.pending_instances >= cfg.instances_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the queued rows, shuffled, as the next shard, then the state to resume after it."""
        if not self.pending_instances:
            return
        prov = {k: torch.cat(v) for k, v in self.pending_prov.items()}
        perm = torch.randperm(next(iter(prov.values())).shape[0], generator=self.gen)
        self.writer.write_shard({p: list(xs) for p, xs in self.pending_acts.items()}, prov, perm)  # the batches, not concatenated
        self.done += self.pending_instances
        self.writer.save_progress({"key": self.key, "dims": self.writer.hook_dims, "instances_done": self.done},
                                  {"rng_state": self.gen.get_state()})
        for xs in self.pending_acts.values():
            xs.clear()
        self.pending_prov, self.pending_instances = {}, 0


def collect(dataset: DatasetSpec, subject, store_dir: Path, part: tuple[int, int] | None = None) -> dict:
    """Write ``dataset``'s activation store from a loaded ``subject``; returns the manifest.
    Resumes an unfinished collection of the same spec and subject found in ``store_dir``.

    With ``part = (i, n)`` this is worker i of n (``saeclt stage collect SPEC --shard i/n``):
    it collects its own run of inputs into ``store_dir/part-i-of-n/``; once every part is
    complete, ``merge_parts`` joins them into one store (the collect stage does it)."""
    cfg = dataset.collect
    available = subject.hook_points()
    points = expand_hook_points(cfg.hook_points, available)  # patterns such as encoder.layer.* become names
    key = progress_key(dataset, subject, points)
    lo, hi = (0, cfg.n_instances) if part is None else part_range(cfg.n_instances, cfg.batch_size, part)
    if part is not None:
        key += f":part{part[0]}/{part[1]}"
        store_dir = part_dir(store_dir, part)
    run = _Collection(dataset, subject, store_dir, key, lo, hi, part)
    skip = run.start()
    if hasattr(subject, "activation_batches"):
        batches = subject.activation_batches(points, cfg.n_instances, cfg.seed, cfg.batch_size, skip=skip, stop=hi)
    else:
        batches = recorded_batches(subject, points, available, cfg.n_instances, cfg.seed, cfg.batch_size, skip=skip, stop=hi)
    text = cfg.text
    tokens, started = 0, time.perf_counter()
    with torch.no_grad(), progress_bar(total=hi - lo, desc=f"collect {dataset.id}", unit="inst", initial=skip - lo) as bar:
        for acts, provenance, keep, n_inputs in batches:
            if run.done + run.pending_instances >= hi:
                break  # this worker's run of inputs is done
            rows = next(iter(acts.values())).shape[0]
            keep = torch.ones(rows, dtype=torch.bool) if keep is None else keep.clone()
            if text is not None and text.outlier_norm_multiple is not None:
                keep &= within_norm_bound(acts, keep, text.outlier_norm_multiple)
            run.add({p: acts[p] for p in points}, provenance, keep, n_inputs, skip)
            tokens += int(keep.sum())
            bar.update(n_inputs)
            bar.set_postfix(rows_per_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
        run.flush()
    if run.writer is None:
        raise DataError(f"dataset '{dataset.id}': no inputs were collected (collect.n_instances = {cfg.n_instances}, inputs {lo}-{hi})")
    return run.writer.finish(keep_raw_stats=part is not None)


def part_status(store_dir: Path) -> tuple[int, int] | None:
    """(complete parts, n) of a sharded collection in ``store_dir``, or None if there is none."""

    counts: dict[int, int] = {}
    for folder in store_dir.glob("part-*-of-*"):
        m = re.fullmatch(r"part-(\d+)-of-(\d+)", folder.name)
        if m:
            counts.setdefault(int(m.group(2)), 0)
            counts[int(m.group(2))] += int((folder / MANIFEST).exists())
    if not counts:
        return None
    n = max(counts)
    return counts[n], n


def complete_parts(store_dir: Path) -> int | None:
    """n when ``store_dir`` holds n complete worker parts of one sharded collection, else None."""

    found = {}
    for folder in store_dir.glob("part-*-of-*"):
        m = re.fullmatch(r"part-(\d+)-of-(\d+)", folder.name)
        if m and (folder / MANIFEST).exists():
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    for n, indices in found.items():
        if indices == set(range(n)):
            keys = {read_json(part_dir(store_dir, (i, n)) / MANIFEST)["part"]["key"].rsplit(":part", 1)[0] for i in range(n)}
            if len(keys) == 1:
                return n
    return None


def merge_parts(store_dir: Path, n: int) -> dict:
    """Join n complete worker parts into one store: shards renumbered and moved (no copy),
    statistics combined from the parts' raw sums, one manifest. The parts are removed."""

    check_own_folder(store_dir, store_owned, STORE_ROLE)
    parts = [part_dir(store_dir, (i, n)) for i in range(n)]
    manifests = [read_json(p / MANIFEST) for p in parts]
    first = manifests[0]
    meta = {k: v for k, v in first.items() if k in ("subject", "n_instances", "meta", "inputs")}
    writer = StoreWriter(store_dir, first["hook_points"], first["dtype"], meta)
    for p, m in zip(parts, manifests):
        raw = RunningStats.load_raw(p)
        for hook, stats in writer.stats.items():
            stats.merge(raw[hook])
        for shard in m["shards"]:
            name = f"shard_{len(writer.shards):05d}.safetensors"
            (p / shard["file"]).rename(store_dir / name)
            writer.shards.append({**shard, "file": name})
        writer.dropped_rows += m.get("dropped_nonfinite_rows", 0)
    manifest = writer.finish()
    for p in parts:
        remove_own_folder(p, store_owned, STORE_ROLE)
    return manifest
