"""The training run's metric logger: JSON lines, log lines, progress bar and optional TensorBoard.

Every record is one JSON line appended to ``<out>/metrics.jsonl`` (complete lines survive a
crash), mirrored to TensorBoard (``<out>/tb``) when asked. Every ``log_every`` steps a log line
reports ETA, iteration time, data time, throughput and peak memory (DINO's MetricLogger): the
medians over a recent window beside the global averages (:class:`Window`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


def fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0, seconds))))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (peak RSS)


class Window:
    """Recent values of a metric: median over a window and global average (DINO's SmoothedValue)."""

    def __init__(self, size: int = 20):
        self.values: deque[float] = deque(maxlen=size)
        self.total, self.count = 0.0, 0

    def add(self, v: float) -> None:
        self.values.append(v)
        self.total += v
        self.count += 1

    @property
    def median(self) -> float:
        return float(np.median(self.values)) if self.values else float("nan")

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Records of one run: ``header`` is added to every record but the start event.

    ``fresh``: a new run (not a resumed one), whose stale records are removed first;
    ``tensorboard``: a folder to mirror the records to; ``total``: the step the run stops at.
    """

    def __init__(self, path: Path, header: dict, *, fresh: bool, tensorboard: Path | None, total: int):
        self.path, self.header, self.total = path, header, total
        if fresh and path.exists():
            path.unlink()
        self.tb = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(tensorboard))
        self.windows = {k: Window() for k in ("loss", "iter", "data")}
        self.bar = None

    def record(self, rec: dict, *, with_header: bool = True) -> None:
        with self.path.open("a") as f:  # one line per call: complete lines survive a crash
            f.write(json.dumps({**rec, **self.header} if with_header else rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    @contextlib.contextmanager
    def progress(self, initial: int, enabled: bool) -> Iterator[None]:
        """A progress bar from step ``initial``, log lines written through it (so they do not break it)."""
        # disable=None: no bar when stderr is not a terminal (CI logs keep the log lines only)
        self.bar = tqdm(
            total=self.total,
            initial=initial,
            disable=None if enabled else True,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            with logging_redirect_tqdm() if enabled else contextlib.nullcontext():
                yield
        finally:
            self.bar.close()
            if self.tb is not None:
                self.tb.flush()

    def step_done(self, step: int, loss: float, iter_time: float, data_time: float) -> float:
        """Count optimiser step ``step``; returns the ETA of the rest (s), from the global average as DINO."""
        self.bar.update(1)
        self.windows["loss"].add(loss)
        self.windows["iter"].add(iter_time)
        self.windows["data"].add(data_time)
        return self.windows["iter"].avg * (self.total - step)  # robust to one slow window

    def log_step(
        self,
        *,
        step: int,
        epoch: float,
        lr: float,
        terms: dict[str, float],
        iter_time: float,
        data_time: float,
        images: int,
        eta: float,
        device: torch.device,
    ) -> None:
        """Record and log the step's loss terms, timings, throughput and peak memory."""
        w = self.windows
        mem = peak_memory_mb(device)
        self.record(
            {
                "step": step,
                "epoch": epoch,
                "lr": lr,
                **terms,
                "iter_time": iter_time,
                "data_time": data_time,
                "images_per_s": images / iter_time,
                "peak_mem_mb": mem,
                "eta_s": eta,
            }
        )
        terms_txt = "  ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "loss")
        log.info(
            "step %d/%d  eta %s  loss %.4f (%.4f)  %s  lr %.2e  iter %.3fs (avg %.3fs)  "
            "data %.3fs (%.0f%%)  %.1f img/s  max mem %.0f MB",
            step,
            self.total,
            fmt_eta(eta),
            terms["loss"],
            w["loss"].avg,
            terms_txt,
            lr,
            w["iter"].median,
            w["iter"].avg,
            w["data"].median,
            100 * w["data"].median / max(w["iter"].median, 1e-9),
            images / max(w["iter"].median, 1e-9),
            mem,
        )
        self.bar.set_postfix(loss=f"{w['loss'].median:.3f}", data=f"{w['data'].median:.3f}s", mem=f"{mem:.0f}MB")

    def log_validation(self, step: int, split: str, res: dict, seconds: float) -> None:
        log.info(
            "validation %s (%d images, %.1fs): seen mIoU %.3f  unseen mIoU %.3f  hIoU %.3f  FB-IoU %.3f",
            split,
            res["images"],
            seconds,
            res["seen_miou"],
            res["unseen_miou"],
            res["harmonic_miou"],
            res["fb_iou"],
        )
        self.record({"step": step, "val": res})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
