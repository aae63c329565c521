"""Device and precision resolution: one rule for the pipeline, the trainer and the evaluator.

``auto`` means a CUDA GPU when one is present; a requested but missing GPU falls back to
the CPU with a warning; an unknown name is a ValueError naming the valid ones.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda if present; a requested but missing GPU falls back to cpu with a warning."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device '{device}'; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device '%s' requested but no CUDA GPU is available; falling back to cpu", device)
        return torch.device("cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on cuda, fp32 on cpu; anything else must be one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose from {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision
