"""saeclt against EleutherAI sparsify and SAELens: TopK SAE, 384 -> 3072, k = 32, batch 4096,
one epoch over the same training rows, held-out FVU and dead fraction on the same rows.

The peers live in their own environment (they pin other versions of things). One command runs
every trainer side by side, each in a process of its own, round after round, and prints one table
with tokens/s, FVU, dead fraction, the encoder matmuls timed in the same run, and saeclt's speed
over the fastest peer's:

    python -m venv PEER && PEER/bin/pip install torch==2.13.0 eai-sparsify sae-lens
    python benchmarks/peers.py all --peers-python PEER/bin/python [--rounds 2] [--trainers ...]

It runs these steps, which can also be run one at a time (each prints one JSON line):

    python benchmarks/peers.py export --spec specs/minilm_sae_L2.yaml --out /tmp/peer_data
    python benchmarks/peers.py saeclt --spec specs/minilm_sae_L2.yaml --out /tmp/peer_data [--precision bf16] [--one-pass] [--set KEY=VALUE ...]
    PEER/bin/python benchmarks/peers.py sparsify --out /tmp/peer_data [--passes 3] [--auxk] [--bf16] [--save DIR]
    PEER/bin/python benchmarks/peers.py saelens --out /tmp/peer_data [--bf16] [--save DIR]

`export` writes the raw (unnormalised) training rows in saeclt's epoch-0 order and the
validation rows as .npy. The peers run with their own default recipes (sparsify: SignSGD with
schedule-free momentum, its latent-scaled learning rate, decoder bias at the data mean;
SAELens: Adam 3e-4, constant schedule, its TopK SAE with AuxK), plus AuxK for sparsify
(auxk_alpha 1/32, dead after 5 steps' tokens) since its default leaves it off. `--bf16` runs a
peer's training under torch's bf16 autocast (their trainers enable it on CUDA only). saeclt's
`--one-pass` trains as the peers do, once over the rows (no data echoing, no decoder refit),
with the fast step and AuxK on; without it, the spec's own recipe. `--set KEY=VALUE` (repeatable)
overrides a field of the spec's `train:` section after those (e.g. `--one-pass --set lr=2e-2
--set beta2=0.95 --set decoder_refit_frac=0.5`: a one-pass recipe; the refit reads no new rows and
takes no extra optimiser step, so it stays one pass). saeclt's tokens/s count its
whole train() (reading the store, start-up, saving); the peers' only their training loop over
rows already in RAM.
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
    active = 0
    fired = None
    mean = val.mean(0)
    for x in val.split(8192):
        y_hat, z = encode_decode(x)
        num += float(((x - y_hat).double() ** 2).sum())
        den += float(((x - mean).double() ** 2).sum())
        active += int((z != 0).sum())
        f = (z > 0).any(0)
        fired = f if fired is None else fired | f
    return {"fvu": num / den, "dead_fraction": float((~fired).float().mean()), "l0": active / val.shape[0]}


def export(args) -> None:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sae_clt.data.loader import PairLoader
    from sae_clt.stages.inputs import experiment_inputs as _experiment

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

    from sae_clt.stages.inputs import experiment_inputs as _experiment

    resolved, store, norm = _experiment(Path(args.spec))
    overrides = {"precision": args.precision} if args.precision else {}
    if args.one_pass:  # as the peers train: once over the rows, the fast step, AuxK on (the spec's aux_k)
        overrides |= {"step": "fast", "echo": 1, "decoder_refit_frac": 0.0}
    overrides |= _train_overrides(resolved.experiment.train, args.set or [])
    summary, m, rate = fit_and_evaluate(resolved.experiment, store, norm, overrides)
    print(json.dumps({"trainer": "saeclt", **overrides, "steps": summary["steps"], "fvu": m["reconstruction"]["fvu"],
                      "dead_fraction": m["sparsity"]["dead_fraction"], "l0": m["sparsity"]["l0"], "tokens_per_s": rate}))


def _train_overrides(train, pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as overrides of the spec's train section, checked and typed by the
    section's own model (a misspelt field or a value out of range stops here, not after training)."""
    raw = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE")
        if key not in type(train).model_fields:
            raise SystemExit(f"--set {key}: not a field of the train section; choose from {', '.join(type(train).model_fields)}")
        raw[key] = json.loads(value) if value[:1] in "[{" or value in ("true", "false", "null") else value
    if not raw:
        return {}
    checked = type(train).model_validate(train.model_dump() | raw)  # pydantic converts '2e-2' to 0.02 for a float field, etc.
    return {key: getattr(checked, key) for key in raw}


def _autocast(args):
    """bf16 autocast on the CPU for a peer's training with --bf16 (fp32 master weights, as saeclt's)."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


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
        with _autocast(args):
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
    if args.save:  # its own format, for `saeclt compare SPEC FOLDER`
        sae.save_to_disk(args.save)

    @torch.no_grad()
    def run(x):
        out = sae(x)
        z = torch.zeros(x.shape[0], D_SAE).scatter(1, out.latent_indices, out.latent_acts)
        return out.sae_out, z

    print(json.dumps({"trainer": "sparsify" + (" +auxk" if args.auxk else "") + (f" x{args.passes} passes" if args.passes > 1 else "")
                      + (" bf16" if args.bf16 else ""),
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
    with _autocast(args):
        trainer.fit()
    seconds = time.perf_counter() - started
    if args.save:  # its inference form and format, for `saeclt compare SPEC FOLDER`
        sae.save_inference_model(args.save)

    @torch.no_grad()
    def run(x):
        z = sae.encode(x)
        return sae.decode(z), z

    print(json.dumps({"trainer": "saelens" + (" bf16" if args.bf16 else ""), **fvu_and_dead(run, val), "tokens_per_s": n_batches * BATCH / seconds}))


# Every trainer `all` can run: which interpreter (saeclt's or the peers'), and the arguments.
TRAINERS = {
    "saeclt-bf16": ("self", ["saeclt", "--precision", "bf16", "--one-pass"]),
    "saeclt-fp32": ("self", ["saeclt", "--precision", "fp32", "--one-pass"]),
    "saeclt-recipe": ("self", ["saeclt"]),
    "sparsify": ("peer", ["sparsify"]),
    "sparsify-auxk": ("peer", ["sparsify", "--auxk"]),
    "sparsify-bf16": ("peer", ["sparsify", "--auxk", "--bf16"]),
    "saelens": ("peer", ["saelens"]),
    "saelens-bf16": ("peer", ["saelens", "--bf16"]),
}


def run_all(args) -> None:
    """Every trainer in its own process, round after round (each round starting one trainer later,
    as this host's speed drifts), with the encoder matmuls timed before each round; one table."""
    import statistics
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _common import cpu_description, encoder_matmul_ms

    names = [n.strip() for n in args.trainers.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRAINERS]
    if unknown:
        raise SystemExit(f"--trainers: unknown {', '.join(unknown)}; choose from {', '.join(TRAINERS)}")
    needs_peer = any(TRAINERS[n][0] == "peer" for n in names)
    if needs_peer and not args.peers_python:
        raise SystemExit("--peers-python: the Python of an environment with eai-sparsify and sae-lens installed is needed "
                         "for " + ", ".join(n for n in names if TRAINERS[n][0] == "peer") + " (or leave them out with --trainers)")
    script, out = str(Path(__file__).resolve()), Path(args.out)
    common = ["--out", str(out), "--spec", args.spec]
    if not (out / "train.npy").exists() or not (out / "val.npy").exists():
        subprocess.run([sys.executable, script, "export", *common], check=True)
    import numpy as np

    d_in = int(np.load(out / "train.npy", mmap_mode="r").shape[1])
    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results: dict[str, list[dict]] = {n: [] for n in names}
    matmuls = []
    for r in range(args.rounds):
        mm = {"bf16": encoder_matmul_ms(BATCH, d_in, D_SAE, torch.bfloat16), "fp32": encoder_matmul_ms(BATCH, d_in, D_SAE, torch.float32)}
        matmuls.append(mm)
        print(f"round {r + 1}: encoder matmul bf16 {mm['bf16']:.1f} ms, fp32 {mm['fp32']:.1f} ms", flush=True)
        for name in names[r % len(names):] + names[:r % len(names)]:
            which, argv = TRAINERS[name]
            python = sys.executable if which == "self" else args.peers_python
            done = subprocess.run([python, script, *argv, *common], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            row = json.loads(lines[-1])
            results[name].append(row)
            print(f"  {name:<15} {row['tokens_per_s']:>9,.0f} tokens/s  FVU {row['fvu']:.4f}  dead {row['dead_fraction']:.3f}", flush=True)
    print(f"\n{'trainer':<15}{'tokens/s (median)':>19}{'per round':>30}{'FVU':>9}{'dead':>8}")
    rate = {n: statistics.median(row["tokens_per_s"] for row in rows) for n, rows in results.items()}
    for name, rows in results.items():
        per = ", ".join(f"{row['tokens_per_s']:,.0f}" for row in rows)
        print(f"{name:<15}{rate[name]:>19,.0f}{per:>30}{rows[-1]['fvu']:>9.4f}{rows[-1]['dead_fraction']:>8.3f}")
    print("encoder matmul per round (ms): " + ", ".join(f"bf16 {m['bf16']:.1f} / fp32 {m['fp32']:.1f}" for m in matmuls))
    peers = {n: v for n, v in rate.items() if TRAINERS[n][0] == "peer"}
    for ours in ("saeclt-bf16", "saeclt-fp32", "saeclt-recipe"):
        # saeclt in fp32 against the peers in fp32; otherwise against the fastest peer in any precision
        rivals = {n: v for n, v in peers.items() if not (ours == "saeclt-fp32" and n.endswith("-bf16"))}
        if ours in rate and rivals:
            fastest = max(rivals, key=rivals.get)
            print(f"{ours} / fastest {'fp32 ' if ours == 'saeclt-fp32' else ''}peer ({fastest}): {rate[ours] / rivals[fastest]:.2f}x")
    print(json.dumps({"tokens_per_s": rate, "fvu": {n: rows[-1]["fvu"] for n, rows in results.items()}, "matmul_ms": matmuls}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["all", "export", "saeclt", "sparsify", "saelens"])
    parser.add_argument("--spec", default="specs/minilm_sae_L2.yaml")
    parser.add_argument("--out", default="/tmp/peer_data")
    parser.add_argument("--auxk", action="store_true", help="sparsify: AuxK on (its default is off)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="saeclt: override train.precision (the spec's: auto)")
    parser.add_argument("--passes", type=int, default=1, help="sparsify: train on the rows this many times (reshuffled); "
                        "its steps then match saeclt's data echoing; tokens/s counts rows read")
    parser.add_argument("--dead-tokens", type=int, default=5 * BATCH)
    parser.add_argument("--one-pass", action="store_true", help="saeclt: train once over the rows as the peers do "
                        "(fast step, no data echoing, no decoder refit; AuxK as the spec sets it)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="saeclt: override a field of the spec's train "
                        "section (repeatable; applied after --precision and --one-pass), e.g. --set lr=2e-2 --set warmup_frac=0.8")
    parser.add_argument("--bf16", action="store_true", help="sparsify, saelens: train under bf16 autocast")
    parser.add_argument("--save", help="sparsify, saelens: save the trained dictionary in the tool's own format into this "
                        "folder (then: saeclt compare SPEC FOLDER)")
    parser.add_argument("--peers-python", help="all: the Python of the environment with eai-sparsify and sae-lens")
    parser.add_argument("--rounds", type=int, default=1, help="all: times each trainer runs (the table shows medians)")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="all: comma-separated, from " + ", ".join(TRAINERS))
    args = parser.parse_args()
    {"all": run_all, "export": export, "saeclt": run_saeclt, "sparsify": run_sparsify, "saelens": run_saelens}[args.what](args)


if __name__ == "__main__":
    main()
