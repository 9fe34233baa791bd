"""Training curves: one TSV per metric (columns step, <name>), which `dvc plots` renders, and the
usage histogram (how many latents fire at each order of frequency)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_write_text

CURVES = ("loss", "mse", "aux_loss", "fvu", "l0", "dead_fraction", "lr")
FIRING = "firing_frequency"  # per-latent firing frequency in a step's batch (a tensor, for the usage histogram)
# Usage histogram bins: silent, then firing frequencies in decades.
USAGE_BINS = ("silent", "below_1e-4", "1e-4_to_1e-3", "1e-3_to_1e-2", "1e-2_to_1e-1", "above_1e-1")


class CurveWriter:
    """One TSV per metric under ``folder`` (columns: step, <metric>), rewritten atomically."""

    def __init__(self, folder: Path, names: tuple[str, ...]):
        self.folder = Path(folder)
        self.rows: dict[str, list[str]] = {name: [f"step\t{name}"] for name in names}

    def add(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows.setdefault(name, [f"step\t{name}"]).append(f"{step}\t{value:.6g}")

    def add_usage(self, step: int, frequency: torch.Tensor) -> None:
        """One row of the usage histogram (how many latents fire at each order of frequency)."""
        bins = torch.bucketize(frequency.double(), torch.tensor([1e-4, 1e-3, 1e-2, 1e-1], dtype=torch.float64), right=True) + 1
        bins[frequency == 0] = 0
        counts = torch.bincount(bins, minlength=len(USAGE_BINS)).tolist()
        rows = self.rows.setdefault("usage_histogram", ["step\t" + "\t".join(USAGE_BINS)])
        rows.append(f"{step}\t" + "\t".join(str(c) for c in counts))

    def flush(self) -> None:
        for name, lines in self.rows.items():
            atomic_write_text(self.folder / f"{name}.tsv", "\n".join(lines) + "\n")
