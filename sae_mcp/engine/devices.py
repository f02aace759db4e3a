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


def check_n_devices(device: str, n_devices: int) -> int:
    """--n-devices N: 1, or N CUDA devices this box has (the model's blocks are split over cuda:0..N-1)."""
    if n_devices < 1:
        raise LoadError(f"--n-devices {n_devices}: pass 1 or more")
    if n_devices == 1:
        return 1
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not device.startswith("cuda") or count < n_devices:
        raise LoadError(f"--n-devices {n_devices} splits the model over GPUs, but {device} with {count} CUDA "
                        "device(s) is what this box has: pass --device cuda and at most that many")
    return n_devices


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32' (how settings, results and sae-lens name dtypes)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
