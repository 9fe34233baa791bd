"""Shared by the benchmark scripts: train and evaluate a spec variant in a scratch folder."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_description() -> str:
    """The CPU's model name and the matrix features that decide the bf16 matmul's speed (on this
    project's 2-core VMs: ~11 ms with AMX, ~25 ms with AVX512-BF16 alone, at 4096 x 384 x 3072)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    features = [name for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX-512", "avx512f")) if flag in flags]
    return f"{model} ({', '.join(features) or 'no AVX-512'})"


def fit_and_evaluate(spec, store, norm, train_updates: dict | None = None, model_updates: dict | None = None):
    """Train ``spec`` (with overrides; causal check off) on the store; returns (train summary,
    eval metrics, training rows read per second). Nothing is written to the project."""
    from sae_clt.evaluation.evaluate import evaluate
    from sae_clt.training.loop import train

    spec = spec.model_copy(update={
        "train": spec.train.model_copy(update=train_updates or {}),
        "model": spec.model.model_copy(update=model_updates or {}),
        "evaluate": spec.evaluate.model_copy(update={"causal": False}),
    })
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        summary = train(spec, store, norm, tmp / "d", tmp / "c", tmp / "t.json", log=lambda *_: None)
        seconds = time.perf_counter() - started
        metrics = evaluate(spec, store, norm, tmp / "d", None, tmp / "e", tmp / "e.json")
    return summary, metrics, summary["rows_read"] / seconds  # tokens read (data echoing trains on each more than once)


def load_experiment(argv: list[str], default: str = "specs/minilm_sae_L2.yaml"):
    """(spec, store, normalisation) of the experiment named on the command line, with a header line
    (``-h``/``--help``: the calling script's description, then exit)."""
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print((sys.modules["__main__"].__doc__ or "").strip())
        raise SystemExit(0)
    from sae_clt.stages.inputs import experiment_inputs as _experiment

    resolved, store, norm = _experiment(Path(argv[1] if len(argv) > 1 else default))
    spec = resolved.experiment
    print(f"{spec.id}: {spec.model.architecture} {store.hook_dims[spec.source]} -> {spec.model.d_sae}, k = {spec.model.k}, "
          f"batch {spec.train.batch_size}, {spec.train.epochs} epoch(s)")
    return spec, store, norm


def encoder_matmul_ms(rows: int, d_in: int, d_sae: int, dtype, repeats: int = 15) -> float:
    """Median time of one dense encoder matmul [rows, d_in] @ [d_in, d_sae] in ``dtype``, each
    writing a fresh output: the floor a training step at that shape is compared with. This
    project's VMs drift by 10-20 % over minutes, so rates are best read beside this figure
    measured in the same run."""
    import statistics

    import torch

    x, w = torch.randn(rows, d_in).to(dtype), torch.randn(d_in, d_sae).to(dtype)
    torch.mm(x, w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, w)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
