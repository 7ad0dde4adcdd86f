"""Where a run's metrics go: one JSON object per line in `metrics.jsonl`, and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """A JSON-ready Python number (NaN becomes None) from a NumPy / JAX scalar."""
    value = np.asarray(value).item() if not isinstance(value, (str, int, float, bool)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is installed,
    only to accept torch tensors, which costs a run seconds of its start; the writer here is given Python floats.
    A process that has torch already keeps it, and one that imports torch later gets it as usual."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metrics to `run_dir/metrics.jsonl` and `run_dir/tensorboard/`; every line is flushed at once.

    `enabled=False` (processes other than the first of a multi-process run) writes nothing.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            self._tb = _summary_writer_class()(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps > `step` (written after the checkpoint a resumed run starts from)."""
        if not self.enabled:
            return
        self._file.close()
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if line and json.loads(line).get("step", -1) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict[str, Any], phase: str) -> None:
        if not self.enabled:
            return
        record = {"step": step, "phase": phase, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
