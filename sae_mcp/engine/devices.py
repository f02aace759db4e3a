"""Devices and dtypes as settings name them: auto | cpu | cuda | cuda:N | mps, float32 | float16 | bfloat16."""

from __future__ import annotations

import torch

from sae_mcp.errors import LoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {device} was asked for but CUDA is not available here; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LoadError("--device mps was asked for but MPS is not available here; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise LoadError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32' (how settings, results and sae-lens name dtypes)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
