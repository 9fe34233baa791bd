"""Paired A/B of the fast training step: the sae_clt of a git commit (A) against the working
tree (B), at the throughput benchmark's shape (TopK 384 -> 3072, k = 32, batch 4096, AuxK on 5 %
held-dead latents), steps alternating A, B, B, A, ... each after one fresh-output encoder
matmul. On a noisy machine (this 2-core VM swings ±30 % within minutes) the median of the
per-pair ratios B/A is a far steadier figure than two separate runs of train_throughput.py.

    python benchmarks/step_ab.py COMMIT [--precision bf16|fp32] [--steps 30] [--store runs/datasets/minilm_docstrings/store]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import train_throughput as tt  # noqa: E402


def load_commit(commit: str, folder: Path):
    """The commit's sae_clt package, importable as ``sae_clt_at_commit`` (its kernels build under
    their own name)."""
    subprocess.run(f"git -C {ROOT} archive {commit} sae_clt | tar -x -C {folder}", shell=True, check=True)
    (folder / "sae_clt").rename(folder / "sae_clt_at_commit")
    # A kernel name of its own: under the working tree's name (unchanged between commits of one
    # kernel version) both would build into one folder and one process could end up running a
    # single build for both sides.
    source = next(folder / "sae_clt_at_commit" / f for f in ("kernels/build.py", "kernels_build.py", "_kernels_cpp.py")
                  if (folder / "sae_clt_at_commit" / f).exists())
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], capture_output=True, text=True, check=True).stdout.strip()
    text = source.read_text()
    name = re.search(r'^NAME = "([^"]+)"', text, re.M)
    if name:
        source.write_text(text.replace(name.group(0), f'NAME = "{name.group(1)}_at_{sha}"'))
    sys.path.insert(0, str(folder))
    import importlib

    def first(*names):  # modules moved between layouts: the commit's own
        for name in names:
            try:
                return importlib.import_module(f"sae_clt_at_commit.{name}")
            except ImportError:
                continue
        raise ImportError(names)

    dictionary = first("dictionaries.dictionary", "dictionary")
    spec = first("spec.models", "spec")
    fast_step = first("training.fast_step", "fast_step")

    return fast_step, dictionary, spec


def make_step(fast_step, dictionary, spec, data, precision: str, n_dead: int):
    cfg = spec.TrainSection(precision=precision, aux_k=512, dead_after_rows=10**12)
    model = dictionary.Dictionary(dictionary.DictionaryConfig("sae", tt.D_IN, tt.D_IN, tt.D_SAE, "topk", tt.K, "x", "x"), seed=0)
    model.init_from_data(data[:tt.D_SAE], data[:tt.D_SAE])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    with torch.no_grad():  # held-dead latents as in train_throughput.py
        threshold = (data[:tt.BATCH] @ model.W_enc + model.b_enc).topk(tt.K, dim=-1).values[:, -1].median()
        model.b_enc[:n_dead] -= threshold
    step = fast_step.FastTopKStep(model, opt, cfg)
    step.want_metrics = False  # as on training's unlogged steps
    return step, torch.zeros(tt.D_SAE, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--store", default="runs/datasets/minilm_docstrings/store")
    parser.add_argument("--hook", default="encoder.layer.2")
    args = parser.parse_args()
    from sae_clt.dictionaries import dictionary
    from sae_clt.spec import models as spec
    from sae_clt.training import fast_step

    data = tt.rows(argparse.Namespace(store=args.store if Path(args.store).exists() else None, hook=args.hook), tt.BATCH * 4)
    n_dead = int(0.05 * tt.D_SAE)
    with tempfile.TemporaryDirectory() as tmp:
        old = load_commit(args.commit, Path(tmp))
        steps = {"A": make_step(*old, data, args.precision, n_dead), "B": make_step(fast_step, dictionary, spec, data, args.precision, n_dead)}
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        mx, mw = data[:tt.BATCH].to(dtype), torch.randn(tt.D_IN, tt.D_SAE).to(dtype)
        batches = data.split(tt.BATCH)
        times: dict[str, list[float]] = {"A": [], "B": [], "matmul": []}
        for i in range(args.steps + 2):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                step, clock = steps[name]
                clock[:n_dead] = 10**13
                start = time.perf_counter()
                _ = mx @ mw
                matmul = time.perf_counter() - start
                start = time.perf_counter()
                step(batches[i % len(batches)], batches[i % len(batches)], clock, 1e-3)
                if i >= 2:
                    times[name].append(1000 * (time.perf_counter() - start))
                    times["matmul"].append(1000 * matmul)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(b / a for a, b in zip(times["A"], times["B"]))
    print(f"cpu: {tt.cpu_description()}")
    print(f"{args.precision}, {args.steps} pairs: A ({args.commit}) {med['A']:.1f} ms, B (working tree) {med['B']:.1f} ms, "
          f"encoder matmul {med['matmul']:.1f} ms")
    print(f"median B/A {ratio:.3f}; B: {tt.BATCH / med['B'] * 1000:,.0f} tokens/s, {med['B'] / med['matmul']:.2f}x the matmul")


if __name__ == "__main__":
    main()
