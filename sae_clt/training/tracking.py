"""Optional Weights & Biases logging of the training curves.

Offline by default: a run writes to ``<run folder>/wandb`` and can be synced later with
``wandb sync``; it goes online only when credentials are present (``WANDB_API_KEY``) or the
user sets ``WANDB_MODE`` themselves. The run id is returned for the run's metadata
(``train_log.json``), so a dictionary can be traced to its W&B run.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PipelineError


class WandbRun:
    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, spec, cfg, folder: Path, log=print) -> "WandbRun":
        try:
            import wandb
        except ImportError:
            raise PipelineError(f"experiment {spec.id}: train.wandb is on but the wandb package is missing "
                                "(pip install 'saeclt[wandb]', or set train.wandb: false)") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=cfg.wandb_project, name=spec.id, config=spec.model_dump(mode="json"),
                         dir=str(folder), mode=mode, reinit="finish_previous")
        log(f"train {spec.id}: logging to Weights & Biases ({mode}), run {run.id}")
        return cls(run)

    def log(self, step: int, metrics: dict[str, float], firing=None) -> None:
        import wandb

        row = {f"train/{k}": v for k, v in metrics.items()}
        if firing is not None:  # usage histogram: log10 firing frequency of the latents that fired
            fired = firing[firing > 0]
            if fired.numel():
                row["train/log10_firing_frequency"] = wandb.Histogram(fired.log10().numpy())
        self.run.log(row, step=step)

    def finish(self, summary_metrics: dict[str, float]) -> dict[str, str]:
        for name, value in summary_metrics.items():
            self.run.summary[f"final/{name}"] = value
        info = {"wandb_run_id": self.run.id, "wandb_project": self.run.project,
                "wandb_mode": "offline" if self.run.offline else "online"}
        self.run.finish()
        return info
