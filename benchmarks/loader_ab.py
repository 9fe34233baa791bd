"""The loader's batch buffers: reused (the default) against a fresh tensor per batch, paired in
one process. Two loaders over the same shards in the same order feed the fast bf16 TopK step
(384 -> 3072, k = 32, batch 4096) alternately, 10 steps at a time; prints the loader's `next()`
time per batch and the median ratio of the blocks' times (fresh / reused).

    python benchmarks/loader_ab.py [--store runs/datasets/minilm_docstrings/store] [--blocks 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_SAE, K, BATCH, PER_BLOCK = 3072, 32, 4096, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/datasets/minilm_docstrings/store")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of 10 steps per loader (each loader reads blocks x 10 batches)")
    args = parser.parse_args()
    import torch

    from sae_clt.data.loader import PairLoader
    from sae_clt.data.normalize import Normalization
    from sae_clt.data.store import ActivationStore
    from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig
    from sae_clt.spec.models import TrainSection
    from sae_clt.training.fast_step import FastTopKStep

    store = ActivationStore.open(Path(args.store))
    hook, d = next(iter(store.hook_dims.items()))
    n = store.manifest["n_instances"]
    norm = Normalization({hook: torch.zeros(d)}, {hook: torch.ones(d)}, torch.zeros(n, dtype=torch.bool), {hook: torch.zeros(d)})
    streams = {}
    for name in ("reused", "fresh"):
        loader = PairLoader(store, norm, hook, hook, "train", BATCH, seed=0, drop_last=True)
        if name == "fresh":
            loader.buffers._use_count = None  # never reuse
        streams[name] = (x for x, _ in loader.epoch(0))
    if store.manifest["n_rows"] < args.blocks * PER_BLOCK * BATCH:
        raise SystemExit(f"{args.store}: {store.manifest['n_rows']:,} rows, fewer than {args.blocks} blocks of "
                         f"{PER_BLOCK} batches of {BATCH}; pass fewer --blocks")
    model = Dictionary(DictionaryConfig("sae", d, d, D_SAE, "topk", K, hook, hook), seed=0)
    fast = FastTopKStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), TrainSection(precision="bf16", aux_k=256))
    fast.want_metrics = False
    clock = torch.zeros(D_SAE, dtype=torch.long)
    block: dict[str, list[float]] = {"reused": [], "fresh": []}
    waits: dict[str, list[float]] = {"reused": [], "fresh": []}
    for b in range(args.blocks):
        for name in ("reused", "fresh") if b % 2 else ("fresh", "reused"):
            started, waited = time.perf_counter(), 0.0
            for _ in range(PER_BLOCK):
                t = time.perf_counter()
                x = next(streams[name])
                waited += time.perf_counter() - t
                fast(x, x, clock, 1e-3)
                del x
            block[name].append(time.perf_counter() - started)
            waits[name].append(waited)
    ms = {k: 1000 * statistics.median(v) / PER_BLOCK for k, v in waits.items()}
    print(f"store {args.store}, hook {hook} ({d} wide); {args.blocks} blocks of {PER_BLOCK} steps per loader")
    print(f"loader next() per batch: reused buffers {ms['reused']:.2f} ms, fresh tensors {ms['fresh']:.2f} ms")
    print(f"step + next() per batch: reused {1000 * statistics.median(block['reused']) / PER_BLOCK:.1f} ms, "
          f"fresh {1000 * statistics.median(block['fresh']) / PER_BLOCK:.1f} ms; "
          f"median block ratio fresh / reused {statistics.median(f / r for f, r in zip(block['fresh'], block['reused'])):.3f}")


if __name__ == "__main__":
    main()
