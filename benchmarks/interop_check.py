"""Do dictionaries written by `saeclt convert` load and run in SAELens and sparsify themselves?

For each experiment (trained already), writes it in every format it supports, takes validation
rows from its store (raw activations), and runs the written folder through the real library in
its own environment (`SAE.load_from_disk`, `SparseCoder.load_from_disk`); prints, per experiment
and format, the largest difference from saeclt's own reconstruction (relative to its largest
value) and the FVU against the true target rows through each.

    python -m venv PEER && PEER/bin/pip install torch==2.13.0 eai-sparsify sae-lens
    python benchmarks/interop_check.py --peers-python PEER/bin/python [specs/minilm_sae_L2.yaml ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_SPECS = ["specs/minilm_sae_L2.yaml", "specs/minilm_tc_L2_L3.yaml", "specs/sae_L2.yaml", "specs/clt_L0_L2.yaml"]
ROWS = 4096


def fvu(y_hat, y) -> float:
    return float(((y - y_hat).double() ** 2).sum() / ((y - y.mean(0)).double() ** 2).sum())


def load_and_run(folder: Path, fmt: str) -> None:
    """(Run by the peers' Python.) The library's own loader and forward on the saved rows."""
    import torch
    from safetensors.torch import load_file

    rows = load_file(folder.parent / "rows.safetensors")
    x, y, reference = rows["x"], rows["y"], rows["reference"]
    with torch.no_grad():
        if fmt == "saelens":
            from sae_lens import SAE

            model = SAE.load_from_disk(str(folder))
            out = model(x)
            kind = type(model).__name__
        else:
            from sparsify import SparseCoder

            model = SparseCoder.load_from_disk(folder)
            out = model(x).sae_out
            kind = f"SparseCoder(transcode={model.cfg.transcode})"
    error = float((out - reference).abs().max() / reference.abs().max())
    print(json.dumps({"class": kind, "max_relative_difference": error, "fvu_library": fvu(out, y), "fvu_saeclt": fvu(reference, y)}))


# Every architecture / activation pair saeclt writes, as random dictionaries (no training needed):
# SAELens's JumpReLU, ReLU and transcoder classes are loaded and run as well as the TopK ones.
SYNTHETIC = [("sae", "topk"), ("sae", "relu"), ("sae", "jumprelu"), ("sae", "batchtopk"), ("transcoder", "relu"),
             ("transcoder", "jumprelu"), ("transcoder", "topk"), ("skip_transcoder", "relu"), ("skip_transcoder", "batchtopk"),
             ("skip_transcoder", "topk")]


def synthetic_dictionary(architecture: str, activation: str, d: int = 64, seed: int = 0):
    """Random weights and normalisation (per-dim means and scales far from 0 and 1)."""
    import torch

    from sae_clt.dictionaries.dictionary import Dictionary, DictionaryConfig

    cfg = DictionaryConfig(architecture=architecture, d_in=d, d_out=d, d_sae=4 * d, activation=activation, k=8,
                           source="in", target="in" if architecture == "sae" else "out")
    model = Dictionary(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        if activation == "jumprelu":
            model.log_threshold.fill_(-1.0)
        if activation == "batchtopk":
            model.threshold.fill_(0.5)
        mean, scale = torch.randn(d, generator=gen) * 3, torch.rand(d, generator=gen) * 4 + 0.5
        out_mean, out_scale = (mean, scale) if architecture == "sae" else (torch.randn(d, generator=gen), torch.rand(d, generator=gen) + 0.5)
        model.set_normalization(mean, scale, out_mean, out_scale)
    x = torch.randn(ROWS, d, generator=gen) * scale + mean
    return model.eval(), x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", default=DEFAULT_SPECS)
    parser.add_argument("--peers-python", help="Python of an environment with eai-sparsify and sae-lens")
    parser.add_argument("--synthetic", action="store_true", help="random dictionaries of every kind saeclt writes, "
                        "instead of trained experiments (FVU then against saeclt's own reconstruction)")
    parser.add_argument("--load", nargs=2, metavar=("FOLDER", "FORMAT"), help=argparse.SUPPRESS)  # the peers' side
    args = parser.parse_args()
    if args.load:
        load_and_run(Path(args.load[0]), args.load[1])
        return
    if not args.peers_python:
        parser.error("--peers-python is needed (the environment with the libraries to load into)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from safetensors.torch import save_file

    from sae_clt.data.loader import PairLoader
    from sae_clt.dictionaries.dictionary import Dictionary
    from sae_clt.errors import DataError
    from sae_clt.interop.formats import FORMATS, convert
    from sae_clt.stages.inputs import experiment_inputs as _experiment

    print(f"{'dictionary':<28}{'format':<10}{'loaded as':<34}{'max rel. diff':>14}{'FVU (library)':>15}{'FVU (saeclt)':>14}")
    def cases():
        if args.synthetic:
            for architecture, activation in SYNTHETIC:
                model, x = synthetic_dictionary(architecture, activation)
                yield f"{architecture}/{activation}", model, x, model.predict_raw(x)
            return
        for spec_path in args.specs:
            resolved, store, norm = _experiment(Path(spec_path))
            spec = resolved.experiment
            model = Dictionary.load(resolved.paths.dictionary_dir(spec.id))
            loader = PairLoader(store, norm, spec.source_key, spec.target_key, "val", ROWS, seed=0, shuffle=False)
            x, y = next(iter(loader.epoch(0)))
            yield spec.id, model, norm.invert(spec.source_key, x), norm.invert(spec.target_key, y)

    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x, y in cases():
            folder = Path(tmp) / name.replace("/", "-")
            folder.mkdir()
            save_file({"x": x.contiguous(), "y": y.contiguous(), "reference": model.predict_raw(x).contiguous()}, str(folder / "rows.safetensors"))
            for fmt in FORMATS:
                try:
                    convert(model, fmt, folder / fmt, meta={"experiment": name})
                except DataError as exc:
                    print(f"{name:<28}{fmt:<10}not written: {str(exc).split(': ', 1)[1]}")
                    continue
                done = subprocess.run([args.peers_python, __file__, "--load", str(folder / fmt), fmt], capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode or not lines:
                    print(f"{name:<28}{fmt:<10}FAILED to load or run:\n{done.stderr[-2000:]}")
                    continue
                r = json.loads(lines[-1])
                print(f"{name:<28}{fmt:<10}{r['class']:<34}{r['max_relative_difference']:>14.1e}{r['fvu_library']:>15.4f}{r['fvu_saeclt']:>14.4f}")


if __name__ == "__main__":
    main()
