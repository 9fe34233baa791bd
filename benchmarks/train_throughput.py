"""Training-step throughput at the field's reference shape, side by side in one run.

TopK SAE 384 -> 3072 latents, k = 32, batch 4096, AuxK on (aux_k 512 as in training, with 5 % of
the latents held dead -- the most the quality bar allows -- so AuxK does real work: every step
with the MiniLM rows; with the synthetic ones on three batches of four, the held-dead latents all
firing on the fourth; --dead-fraction / --aux-k change that). Prints, for fp32 and bf16:

- one dense encoder matmul of the same shape (fresh output each call), the reference floor, timed
  alternately with the steps so both see the same machine load;
- tokens/s of the plain autograd step and of saeclt's fast step, and step time / matmul time;
- torch.topk against saeclt's top-k kernel on the same pre-activations.

Rows come from an activation store when given (e.g. the MiniLM store of specs/minilm_sae_L2.yaml),
else from a fixed synthetic distribution (sparse combinations of random directions).

    python benchmarks/train_throughput.py [--store runs/datasets/minilm_docstrings/store --hook encoder.layer.2]
        [--dead-fraction 0.05] [--aux-k 512] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_description  # noqa: E402

from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig  # noqa: E402
from sae_clt.kernels.ops import kernel_available, topk_rows  # noqa: E402
from sae_clt.spec.models import TrainSection  # noqa: E402
from sae_clt.training.fast_step import FastTopKStep  # noqa: E402
from sae_clt.training.step import train_step  # noqa: E402

D_IN, D_SAE, K, BATCH = 384, 3072, 32, 4096


def rows(args, n: int) -> torch.Tensor:
    if args.store:
        from sae_clt.data.store import ActivationStore

        store = ActivationStore.open(Path(args.store))
        parts, got = [], 0
        for i in range(store.n_shards):
            x = store.read_shard(i, [args.hook])[args.hook]
            parts.append(x)
            got += x.shape[0]
            if got >= n:
                break
        x = torch.cat(parts)[:n]
        x = x - x.mean(0)
        return x / x.norm(dim=1).mean()
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(8 * D_IN, D_IN, generator=g), dim=1)
    codes = torch.rand(n, 8 * D_IN, generator=g) * (torch.rand(n, 8 * D_IN, generator=g) < 0.01)
    return codes @ atoms + 0.05 * torch.randn(n, D_IN, generator=g)


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def step_ms(kind: str, precision: str, data: torch.Tensor, args) -> tuple[float, float, float]:
    """(median step ms, median matmul ms timed alternately with the steps, last FVU)."""
    cfg = TrainSection(precision=precision, aux_k=args.aux_k, dead_after_rows=10**12)
    model = Dictionary(DictionaryConfig("sae", D_IN, D_IN, D_SAE, "topk", K, "x", "x"), seed=0)
    model.init_from_data(data[:D_SAE], data[:D_SAE])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    clock = torch.zeros(D_SAE, dtype=torch.long)
    n_dead = int(args.dead_fraction * D_SAE)
    with torch.no_grad():  # the held-dead latents sit a typical top-k threshold lower: they rarely
        # win a place (as real dead latents), yet have positive pre-activations for AuxK to use
        threshold = (data[:BATCH] @ model.W_enc + model.b_enc).topk(K, dim=-1).values[:, -1].median()
        model.b_enc[:n_dead] -= threshold
    fast = FastTopKStep(model, opt, cfg)
    batches = data.split(BATCH)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    mx, mw = batches[0].to(dtype), torch.randn(D_IN, D_SAE).to(dtype)
    times, matmuls, fvu = [], [], float("nan")
    for i in range(args.steps + 2):
        x = batches[i % len(batches)]
        clock[:n_dead] = 10**13  # these latents count as dead: AuxK works every step
        fast.want_metrics = i == args.steps + 1  # training logs metrics every log_every (10) steps
        start = time.perf_counter()
        _ = mx @ mw
        matmul = time.perf_counter() - start
        start = time.perf_counter()
        m = fast(x, x, clock, 1e-3) if kind == "fast" else train_step(model, opt, x, x, clock, cfg, True, 1e-3)
        if i >= 2:
            times.append(time.perf_counter() - start)
            matmuls.append(matmul)
            fvu = m.get("fvu", fvu)
    return 1000 * statistics.median(times), 1000 * statistics.median(matmuls), fvu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="activation store folder to take rows from")
    parser.add_argument("--hook", default="encoder.layer.2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dead-fraction", type=float, default=0.05, help="latents held dead (AuxK works on them)")
    parser.add_argument("--aux-k", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = rows(args, BATCH * 4)
    print(f"shape: batch {BATCH}, {D_IN} -> {D_SAE} latents, k = {K}, AuxK {args.aux_k} on {args.dead_fraction:.0%} "
          f"of the latents; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"compiled kernels: {kernel_available()}")
    print(f"cpu: {cpu_description()}")
    print(f"rows: {'store ' + args.store if args.store else 'synthetic'}")

    x = data[:BATCH].contiguous()
    w = torch.randn(D_IN, D_SAE) / D_IN**0.5
    pre = x @ w
    print(f"\ntop-k of [{BATCH}, {D_SAE}], k = {K}: torch.topk {median_ms(lambda: pre.topk(K, dim=-1, sorted=False), 10):.1f} ms, "
          f"saeclt {median_ms(lambda: topk_rows(pre, K), 10):.1f} ms")
    print(f"\n{'precision':<10}{'matmul ms':>10}{'step':>7}{'step ms':>10}{'tokens/s':>11}{'step/matmul':>13}{'last FVU':>10}")
    for precision in ("fp32", "bf16"):
        for kind in ("plain", "fast"):
            ms, matmul, fvu = step_ms(kind, precision, data, args)
            print(f"{precision:<10}{matmul:>10.1f}{kind:>7}{ms:>10.1f}{BATCH / ms * 1000:>11,.0f}"
                  f"{ms / matmul:>13.2f}{fvu:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
