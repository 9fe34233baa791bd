"""Training from an on-disk store larger than the machine's free cache versus from RAM.

Writes (once; reused afterwards) a synthetic float16 store of 384-wide rows of at least
--gigabytes GB, then runs the fast bf16 TopK step (384 -> 3072, k = 32, batch 4096) for the
same number of steps (a) streaming from the store through saeclt's loader (memory-mapped
shards, background prefetch, shuffling across shards) and (b) from a tensor already in RAM.
Each mode runs in its own process, so peak RSS is its own. Prints tokens/s, the ratio, and
peak RSS of each; then, as separate runs drift with this machine's load, a paired run: steps fed
from the store and from RAM alternating in one process, and the median of per-pair ratios.

    python benchmarks/stream.py [--gigabytes 8] [--steps 300] [--store-dir /tmp/saeclt_stream_store] [--cold]

The paired run also feeds steps from a second loader whose shards count as checked already, so
the cost of checking each shard's SHA-256 and values on its first read is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D, D_SAE, K, BATCH = 384, 3072, 32, 4096
HOOK = "resid"


def build_store(folder: Path, gigabytes: float) -> None:
    import torch

    from sae_clt.data.store import MANIFEST, StoreWriter

    if (folder / MANIFEST).exists():
        return
    rows_per_shard = 1 << 16  # 65,536 rows = 50 MB of float16 per shard (collect writes shards of this order)
    n_shards = int(gigabytes * 1e9 / (rows_per_shard * (2 * D + 12))) + 1
    print(f"writing a {n_shards * rows_per_shard * (2 * D + 12) / 1e9:.1f} GB store ({n_shards} shards) to {folder} ...", flush=True)
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(4 * D, D, generator=gen), dim=1)
    writer = StoreWriter(folder, {HOOK: D}, "float16", {"n_instances": n_shards * rows_per_shard, "subject": {"id": "synthetic"}})
    for s in range(n_shards):
        codes = torch.rand(rows_per_shard, 4 * D, generator=gen) * (torch.rand(rows_per_shard, 4 * D, generator=gen) < 0.01)
        x = codes @ atoms + 0.05 * torch.randn(rows_per_shard, D, generator=gen)
        ids = torch.arange(s * rows_per_shard, (s + 1) * rows_per_shard)
        writer.write_shard({HOOK: x}, {"instance_id": ids, "position": torch.zeros(rows_per_shard, dtype=torch.int32)},
                           torch.arange(rows_per_shard))
    writer.finish()


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image; getrusage's
    ru_maxrss survives exec, so a child started by a parent holding gigabytes (the one that just
    wrote the store) would report the parent's peak (2.05 GB here where VmHWM said 0.65)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def evict(folder: Path) -> None:
    """Drop the store's shards from the page cache (POSIX_FADV_DONTNEED; no privileges needed), so
    the next store-fed run reads them from the disk rather than from memory a previous run filled."""
    import os

    for shard in folder.glob("shard_*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_mode(mode: str, folder: Path, steps: int) -> dict:
    import torch

    from sae_clt.data.loader import PairLoader
    from sae_clt.data.normalize import Normalization
    from sae_clt.data.store import ActivationStore
    from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
    from sae_clt.spec.models import TrainSection
    from sae_clt.training.fast_step import FastTopKStep

    store = ActivationStore.open(folder)
    n = store.manifest["n_instances"]
    norm = Normalization({HOOK: torch.zeros(D)}, {HOOK: torch.ones(D)}, torch.zeros(n, dtype=torch.bool), {HOOK: torch.zeros(D)})
    loader = PairLoader(store, norm, HOOK, HOOK, "train", BATCH, seed=0, drop_last=True)
    if mode == "ram":  # the same number of rows, read before the clock starts
        rows = []
        for x, _ in loader.epoch(0):
            rows.append(x.clone())
            if len(rows) == steps:
                break
        batches = iter(rows)
    else:
        batches = (x for x, _ in loader.epoch(0))
    cfg = TrainSection(precision="bf16", aux_k=256)
    model = Dictionary(DictionaryConfig("sae", D, D, D_SAE, "topk", K, HOOK, HOOK), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    fast = FastTopKStep(model, opt, cfg)
    clock = torch.zeros(D_SAE, dtype=torch.long)
    started = time.perf_counter()
    done = 0
    for x in batches:
        fast(x, x, clock, 1e-3)
        done += 1
        if done == steps:
            break
    seconds = time.perf_counter() - started
    return {"mode": mode, "steps": done, "tokens_per_s": done * BATCH / seconds,
            "peak_rss_gb": peak_rss_gb()}


def run_paired(folder: Path, steps: int) -> dict:
    """Steps fed from the store's loader and steps fed from batches already in RAM, alternating in
    one process (so both see the same machine load): the loader's cost per step is the difference."""
    import statistics

    import torch

    from sae_clt.data.loader import PairLoader
    from sae_clt.data.normalize import Normalization
    from sae_clt.data.store import ActivationStore
    from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
    from sae_clt.spec.models import TrainSection
    from sae_clt.training.fast_step import FastTopKStep

    store = ActivationStore.open(folder)
    n = store.manifest["n_instances"]
    norm = Normalization({HOOK: torch.zeros(D)}, {HOOK: torch.ones(D)}, torch.zeros(n, dtype=torch.bool), {HOOK: torch.zeros(D)})
    stream = (x for x, _ in PairLoader(store, norm, HOOK, HOOK, "train", BATCH, seed=0, drop_last=True).epoch(0))
    ram = [next(stream).clone() for _ in range(40)]
    # The same loader over a second opening of the store whose shards count as checked already: what
    # the per-shard checksum and finiteness check on first read costs is the difference.
    unchecked_store = ActivationStore.open(folder)
    unchecked_store.assume_checked()
    unchecked = (x for x, _ in PairLoader(unchecked_store, norm, HOOK, HOOK, "train", BATCH, seed=1, drop_last=True).epoch(0))
    model = Dictionary(DictionaryConfig("sae", D, D, D_SAE, "topk", K, HOOK, HOOK), seed=0)
    fast = FastTopKStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), TrainSection(precision="bf16", aux_k=256))
    fast.want_metrics = False
    clock = torch.zeros(D_SAE, dtype=torch.long)
    times: dict[str, list[float]] = {"disk": [], "ram": [], "unchecked": []}
    orders = [("disk", "ram", "unchecked"), ("ram", "unchecked", "disk"), ("unchecked", "disk", "ram")]
    for i in range(steps // 3):
        for mode in orders[i % 3]:
            start = time.perf_counter()
            x = {"disk": stream, "unchecked": unchecked}[mode].__next__() if mode != "ram" else ram[i % len(ram)]
            fast(x, x, clock, 1e-3)
            times[mode].append(time.perf_counter() - start)
    return {"disk_ms": 1000 * statistics.median(times["disk"]), "ram_ms": 1000 * statistics.median(times["ram"]),
            "unchecked_ms": 1000 * statistics.median(times["unchecked"]),
            "ratio": statistics.median(r / d for d, r in zip(times["disk"], times["ram"])),
            "unchecked_ratio": statistics.median(r / d for d, r in zip(times["unchecked"], times["ram"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--store-dir", default="/tmp/saeclt_stream_store")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cold", action="store_true",
                        help="evict the store from the page cache before each store-fed run (by default the store-fed run "
                             "finds the shards the RAM-fed run before it read still cached)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.store_dir)
    if args.mode:
        print(json.dumps(run_paired(folder, args.steps) if args.mode == "paired" else run_mode(args.mode, folder, args.steps)))
        return
    build_store(folder, args.gigabytes)
    size = sum(p.stat().st_size for p in folder.glob("shard_*.safetensors")) / 1e9
    from _common import cpu_description

    print(f"cpu: {cpu_description()}")
    print(f"store: {size:.1f} GB on disk; {args.steps} steps of {BATCH} rows, fast bf16 TopK step"
          + ("; the store evicted from the page cache before each store-fed run" if args.cold else ""))
    results: dict[str, dict] = {}
    for rep in range(args.repeats):  # alternated, best of each: this machine's timings drift
        for mode in ("disk", "ram"):
            if mode == "disk" and args.cold:
                evict(folder)
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--store-dir", str(folder)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"run {rep + 1} {mode:>5}: {r['tokens_per_s']:>9,.0f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
            best = results.setdefault(mode, r)
            best["tokens_per_s"] = max(best["tokens_per_s"], r["tokens_per_s"])
            best["peak_rss_gb"] = max(best["peak_rss_gb"], r["peak_rss_gb"])
    for mode, r in results.items():
        print(f"{mode:>5}: best {r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB")
    print(f"disk / ram throughput (best of each): {results['disk']['tokens_per_s'] / results['ram']['tokens_per_s']:.3f}")
    if args.cold:
        evict(folder)
    out = subprocess.run([sys.executable, __file__, "--mode", "paired", "--steps", str(args.steps), "--store-dir", str(folder)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"paired in one process: step fed from the store {r['disk_ms']:.1f} ms (shards checked on first read), "
          f"{r['unchecked_ms']:.1f} ms (checks skipped), from RAM {r['ram_ms']:.1f} ms; disk / ram throughput (median of "
          f"per-pair ratios) {r['ratio']:.3f} checked, {r['unchecked_ratio']:.3f} unchecked")


if __name__ == "__main__":
    main()
