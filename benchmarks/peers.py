"""saeclt against EleutherAI sparsify and SAELens: TopK SAE, 384 -> 3072, k = 32, batch 4096,
one epoch over the same training rows, held-out FVU and dead fraction on the same rows.

The peers live in their own environment (they pin other versions of things), so this runs in
three steps; each prints one JSON line:

    python benchmarks/peers.py export --spec specs/minilm_sae_L2.yaml --out /tmp/peer_data
    python benchmarks/peers.py saeclt --spec specs/minilm_sae_L2.yaml --out /tmp/peer_data [--precision bf16]
    PEER/bin/python benchmarks/peers.py sparsify --out /tmp/peer_data [--passes 3]  # pip install eai-sparsify
    PEER/bin/python benchmarks/peers.py saelens --out /tmp/peer_data    # pip install sae-lens

`export` writes the raw (unnormalised) training rows in saeclt's epoch-0 order and the
validation rows as .npy. The peers run with their own default recipes (sparsify: SignSGD with
schedule-free momentum, its latent-scaled learning rate, decoder bias at the data mean;
SAELens: Adam 3e-4, constant schedule, its TopK SAE with AuxK), plus AuxK for sparsify
(auxk_alpha 1/32, dead after 5 steps' tokens) since its default leaves it off.
FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the validation rows (as saeclt's metrics define it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

D_SAE, K, BATCH = 3072, 32, 4096


def fvu_and_dead(encode_decode, val) -> dict:

    num = den = 0.0
    fired = None
    mean = val.mean(0)
    for x in val.split(8192):
        y_hat, z = encode_decode(x)
        num += float(((x - y_hat).double() ** 2).sum())
        den += float(((x - mean).double() ** 2).sum())
        f = (z > 0).any(0)
        fired = f if fired is None else fired | f
    return {"fvu": num / den, "dead_fraction": float((~fired).float().mean()), "l0": None}


def export(args) -> None:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sae_clt.normalize import PairLoader
    from sae_clt.stages import _experiment

    resolved, store, norm = _experiment(Path(args.spec))
    spec = resolved.experiment
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        loader = PairLoader(store, norm, spec.source, spec.source, split, BATCH, seed=spec.train.seed, shuffle=split == "train")
        rows = [norm.invert(spec.source, x) for x, _ in loader.epoch(0)]
        np.save(out / f"{split}.npy", __import__("torch").cat(rows).numpy())
    print(json.dumps({"exported": str(out)}))


def run_saeclt(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _common import fit_and_evaluate

    from sae_clt.stages import _experiment

    resolved, store, norm = _experiment(Path(args.spec))
    overrides = {"precision": args.precision} if args.precision else {}
    _, m, rate = fit_and_evaluate(resolved.experiment, store, norm, overrides)
    print(json.dumps({"trainer": "saeclt", **overrides, "fvu": m["reconstruction"]["fvu"], "dead_fraction": m["sparsity"]["dead_fraction"],
                      "tokens_per_s": rate}))


def _load(args):
    import numpy as np
    import torch

    out = Path(args.out)
    return torch.from_numpy(np.load(out / "train.npy")), torch.from_numpy(np.load(out / "val.npy"))


def run_sparsify(args) -> None:
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    train, val = _load(args)
    d = train.shape[1]
    sae = SparseCoder(d, SparseCoderConfig(num_latents=D_SAE, k=K), device="cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (D_SAE / 2**14) ** 0.5}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    started = time.perf_counter()
    batches = train.split(BATCH)[: len(train) // BATCH]
    n_read = len(batches)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.passes - 1):  # --passes: the same rows again, reshuffled (as many steps as saeclt's echo)
        rows = torch.cat(batches[:n_read])
        batches += rows[torch.randperm(rows.shape[0], generator=gen)].split(BATCH)
    for step, x in enumerate(batches):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > args.dead_tokens if args.auxk else None
        out = sae(x, dead_mask=dead)
        loss = out.fvu + (1 / 32 if args.auxk else 0) * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
    seconds = time.perf_counter() - started
    opt.eval()  # schedule-free: evaluate at the averaged weights
    sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def run(x):
        out = sae(x)
        z = torch.zeros(x.shape[0], D_SAE).scatter(1, out.latent_indices, out.latent_acts)
        return out.sae_out, z

    print(json.dumps({"trainer": "sparsify" + (" +auxk" if args.auxk else "") + (f" x{args.passes} passes" if args.passes > 1 else ""),
                      **fvu_and_dead(run, val), "tokens_per_s": n_read * BATCH / seconds}))


def run_saelens(args) -> None:
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    train, val = _load(args)
    d = train.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=D_SAE, k=K))
    n_batches = len(train) // BATCH
    cfg = SAETrainerConfig(total_training_samples=n_batches * BATCH, train_batch_size_samples=BATCH, lr_end=3e-5)
    trainer = SAETrainer(cfg, sae, data_provider=iter(train.split(BATCH)[:n_batches]))
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started

    @torch.no_grad()
    def run(x):
        z = sae.encode(x)
        return sae.decode(z), z

    print(json.dumps({"trainer": "saelens", **fvu_and_dead(run, val), "tokens_per_s": n_batches * BATCH / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["export", "saeclt", "sparsify", "saelens"])
    parser.add_argument("--spec", default="specs/minilm_sae_L2.yaml")
    parser.add_argument("--out", default="/tmp/peer_data")
    parser.add_argument("--auxk", action="store_true", help="sparsify: AuxK on (its default is off)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="saeclt: override train.precision (the spec's: auto)")
    parser.add_argument("--passes", type=int, default=1, help="sparsify: train on the rows this many times (reshuffled); "
                        "its steps then match saeclt's data echoing; tokens/s counts rows read")
    parser.add_argument("--dead-tokens", type=int, default=5 * BATCH)
    args = parser.parse_args()
    {"export": export, "saeclt": run_saeclt, "sparsify": run_sparsify, "saelens": run_saelens}[args.what](args)


if __name__ == "__main__":
    main()
