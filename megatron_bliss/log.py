"""Rank-aware logging and a metrics writer (JSON lines + TensorBoard), shared by every training loop.

:func:`setup_logging` configures the ``megatron_bliss`` logger once per process: records carry the global rank,
rank 0 logs at the requested level and the other ranks only warnings and errors (so an 8-node job prints one
stream, but a failure on any rank is still visible).

:class:`MetricsWriter` records scalars per step on global rank 0 (other ranks get a no-op writer, so callers need no
rank checks): one JSON object per line in ``RUN_DIR/metrics.jsonl`` and, when TensorBoard is importable, event files
in ``RUN_DIR/tensorboard``. ``purge_step`` makes a resumed run forget the lines a killed run wrote after its last
checkpoint, so the file holds exactly one record per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

from megatron_bliss import parallel

LOGGER_NAME = "megatron_bliss"
METRICS_FILE = "metrics.jsonl"


class _RankFilter(logging.Filter):
    """Adds ``record.rank``; drops records below WARNING on ranks other than 0."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = parallel.launch_rank()
        return record.rank == 0 or record.levelno >= max(self.level, logging.WARNING)


def setup_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Configures the package logger (idempotent) and returns it.

    Args:
        level: level for rank 0; other ranks log WARNING and above.

    Returns:
        The ``megatron_bliss`` logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    logger.setLevel(level)
    if not any(getattr(h, "_megatron_bliss", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter(level))
        handler._megatron_bliss = True
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def _jsonable(value):
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricsWriter:
    """Per-step scalars to ``RUN_DIR/metrics.jsonl`` and TensorBoard; a no-op off global rank 0.

    Args:
        run_dir: directory for ``metrics.jsonl`` and ``tensorboard/``.
        purge_step: when resuming from step N, drop records with ``step > N`` left by an interrupted run.
        tensorboard: also write TensorBoard event files (skipped with a warning when tensorboard is missing).
    """

    def __init__(self, run_dir: str, purge_step: int | None = None, tensorboard: bool = True):
        self.enabled = parallel.launch_rank() == 0
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if purge_step is not None and os.path.exists(self.path):
            self._purge(purge_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
            except ImportError as exc:
                logging.getLogger(LOGGER_NAME).warning("TensorBoard logging disabled: %s", exc)

    def _purge(self, purge_step: int) -> None:
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= purge_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        """Records ``metrics`` (name -> number or None) for ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        """Flushes and closes the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str) -> list[dict]:
    """All records of ``RUN_DIR/metrics.jsonl`` (for tests and plots)."""
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
