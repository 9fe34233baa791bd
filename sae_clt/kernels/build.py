"""Build of saeclt's compiled CPU kernels (C++ with OpenMP in ``cpp/kernels.cpp``; see kernels.py).

Kernels, each replacing a chain of torch calls that would materialise large temporaries:

- ``topk_rows``: fused (bias +) row-wise top-k selection (an AVX-512 version where the CPU has it);
- ``decode_backward``: the decoder as a gather of k rows per input, the reconstruction error and
  its gradient, and the gradient of the k selected activations, in one pass over each row;
- ``latent_grads``: both weight gradients (and the encoder bias gradient) as scatters of the k
  active entries per row, each thread owning a range of latents so that no atomics are needed;
- ``gram_accumulate``: the decoder refit's ZᵀZ from the sparse codes, row by row;
- ``adam_rows``: Adam on a weight matrix in one pass, with the decoder's gradient projection and
  row renormalisation and the bf16 copy the next step's matmul and gathers read fused in;
- ``positive_entries``: each row's positive entries, compacted (AuxK's selection when it keeps
  them all);
- ``center_bf16``: the encoder's bf16 input x - b_dec in one pass;
- ``gather_normalize``: minibatch rows gathered from several shards' stored (memory-mapped)
  tensors, converted to float32 and normalised in one pass (the data loader);
- ``store_rows``: a shard's rows shuffled, converted to the store's dtype, with the manifest's
  running statistics and the check for NaN/inf in the same pass (the collection's writer).

Built on first use with ``-O3 -march=native`` (the build happens on the machine that runs it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
from pathlib import Path

NAME = "saeclt_kernels_v25"

SOURCE_FILE = Path(__file__).parent / "kernels.cpp"
DATA_FILES = ("kernels.cpp",)  # a DVC dependency of every stage that imports this module
SOURCE = SOURCE_FILE.read_text()


FUNCTIONS = ["topk_rows", "decode_backward", "latent_grads", "gram_accumulate", "adam_rows", "positive_entries",
             "gather_normalize", "center_bf16", "store_rows"]
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _fingerprint() -> str:
    """What the built library depends on: the source, the flags, torch and Python, and the CPU's
    features (``-march=native`` code built on one CPU may not run on another that shares the
    cache folder)."""

    import torch

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    text = "\n".join([SOURCE, " ".join(CFLAGS), " ".join(LDFLAGS), torch.__version__, sys.version, cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _record(name: str):
    """The file naming the built library of ``name``: later processes import it directly (torch's
    build machinery, ~0.15 s to import, is then not needed)."""

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saeclt" / "kernels" / f"{name}.path"


def _import(name: str, library: str):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build():
    """Load the kernels, compiling them first where this source, torch and CPU have no build yet
    (once; torch's extension cache keeps it)."""

    name = f"{NAME}_{_fingerprint()}"
    record = _record(name)
    try:
        library = record.read_text().strip()
        if Path(library).is_file():
            return _import(name, library)
    except (OSError, ImportError):
        pass  # no record, or a library that no longer loads: build again

    from torch.utils.cpp_extension import _get_build_directory, load_inline

    if not list(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
        print("saeclt: building the compiled CPU kernels (once, ~1 min; SAECLT_KERNELS=torch skips them)",
              file=sys.stderr, flush=True)
    module = load_inline(name=name, cpp_sources=[SOURCE], functions=FUNCTIONS, extra_cflags=CFLAGS,
                         extra_ldflags=LDFLAGS, verbose=False)
    try:  # written to a temporary file and renamed: a concurrent process never reads half a path
        record.parent.mkdir(parents=True, exist_ok=True)
        temporary = record.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(module.__file__)
        os.replace(temporary, record)
    except OSError:
        pass  # a read-only cache: the next process goes through torch's loader again
    return module
