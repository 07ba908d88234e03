"""Training scalars to TensorBoard and to RUN/metrics.jsonl (rank 0 only).

TensorBoard tags are ``<split>/<name>`` (``train/loss``, ``eval/mlm_loss``) with the optimizer
step as the global step. The JSON lines carry the same numbers for scripts and tests.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, run: Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after its last checkpoint.
        self._tb = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=purge_step)
        self._jsonl = open(run / "metrics.jsonl", "a", buffering=1)

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(f"{split}/{name}", value, global_step=step)
        self._jsonl.write(json.dumps({"split": split, "step": step, **values}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
