"""Collection overhead: hooks, early stop, shuffling, checksums and writing, against the
subject's bare forward pass over the same inputs, timed side by side in one run.

For a dataset spec (default: MiniLM's, which needs the [hf] extra), over --windows inputs:

- bare forward: the whole model, no hooks (what running the subject costs anyway);
- bare forward to the last hook point: the same, cut after the deepest hook point collected
  (the floor for collection, which stops there too);
- collect: saeclt's collect(), writing a complete store into a temporary folder.

    python benchmarks/collect.py [specs/datasets/minilm_docstrings.yaml] [--windows 512]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sae_clt.data.collect import collect  # noqa: E402
from sae_clt.data.hooks import StopForward, expand_hook_points, recording  # noqa: E402
from sae_clt.spec.project import Paths, find_root, resolve_dataset  # noqa: E402
from sae_clt.subjects import load_subject  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="specs/datasets/minilm_docstrings.yaml")
    parser.add_argument("--windows", type=int, default=512, help="inputs to run (overrides collect.n_instances)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the three timings, interleaved")
    args = parser.parse_args()
    path = Path(args.dataset).resolve()
    paths = Paths(find_root(path.parent))
    dataset, subject_spec = resolve_dataset(paths, path.stem)
    dataset = dataset.model_copy(update={"collect": dataset.collect.model_copy(update={"n_instances": args.windows})})
    subject = load_subject(subject_spec, paths.subject_dir(subject_spec.id), paths.root)
    subject.configure(dataset)
    cfg = dataset.collect
    available = subject.hook_points()
    points = expand_hook_points(cfg.hook_points, available)
    batches = [inputs for inputs, _, _ in subject.input_batches(cfg.n_instances, cfg.seed, cfg.batch_size)]  # inputs prepared up front

    @torch.no_grad()
    def bare_full():
        for inputs in batches:
            subject.forward(inputs)

    @torch.no_grad()
    def bare_to_last_hook():
        for inputs in batches:  # hooks record nothing but the cut: the pass ends where collection's does
            with recording(subject.model, points[-1:], available, stop_after=True):
                with contextlib.suppress(StopForward):
                    subject.forward(inputs)

    def run_collect():
        with tempfile.TemporaryDirectory() as tmp:
            collect(dataset, subject, Path(tmp) / "store")

    run_collect()  # warm-up (and builds the windows' cache)
    # The three interleaved, round after round: this project's VMs drift by 10-20 % over minutes,
    # and timing each block of repeats in turn put that drift into the ratio (+6 % and +23 % in
    # two runs minutes apart). The overhead is the median of the rounds' own ratios.
    rounds = [(timed(bare_full, 1), timed(bare_to_last_hook, 1), timed(run_collect, 1)) for _ in range(args.repeats)]
    full, cut, coll = (statistics.median(column) for column in zip(*rounds))
    paired = statistics.median(c / k for _, k, c in rounds)
    rows = sum(b["input_ids"].numel() if isinstance(b, dict) else b.shape[0] * b.shape[1] for b in batches)
    print(f"dataset {dataset.id}: {args.windows} inputs, {rows:,} positions, hook points {', '.join(points)}, dtype {cfg.dtype}")
    print(f"bare forward, whole model        {full:7.2f} s  ({rows / full:,.0f} positions/s)")
    print(f"bare forward to the last hook    {cut:7.2f} s")
    print(f"saeclt collect (store written)   {coll:7.2f} s  ({rows / coll:,.0f} positions/s)")
    print("rounds (whole, to last hook, collect; s): " + ", ".join(f"({f:.2f}, {k:.2f}, {c:.2f})" for f, k, c in rounds))
    print(f"collect / whole forward = {coll / full:.3f}; collect / forward to the last hook = {coll / cut:.3f} "
          f"(medians); median of the {args.repeats} rounds' ratios {paired:.3f} (overhead {100 * (paired - 1):+.1f} %)")


if __name__ == "__main__":
    main()
