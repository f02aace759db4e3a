"""Will it fit? An estimate of the memory a model, its SAEs and a corpus scan need, checked before the model loads,
so a model too big for the device is refused with what to pass instead of an out-of-memory crash minutes in.

    weights      every parameter of the model at the load dtype: transformer-lens' n_params counts the blocks
                 only, so the embedding, the unembedding and (when learned) the positional embedding are added
    load peak    loading converts a Hugging Face model, held in float32, into transformer-lens weights: the peak
                 holds both (measured on the CPU: the peak RSS of a local load is ~weights + the fp32 copy)
    SAEs         W_enc, W_dec and the biases of each SAE, at the load dtype
    scan state   per feature of each SAE: top-K values and positions, the count, the 64-bin histogram and the
                 interval samples (scan.py): ~2.7 kB, held on the device during an index build
    working      a cushion for activations and a batch (the scan sizes its batches to ~40% of what is free on
                 CUDA and ~128 MB on the CPU)

With --n-devices N the weights are split over N GPUs (transformer-lens' n_devices); the estimate is compared with
the free memory of those N devices together, and of the CPU's available memory otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sae_mcp.errors import LoadError

SCAN_BYTES_PER_FEATURE = 50 * (4 + 8) + 8 + 64 * 8 + 32 * 4 * (8 + 4)  # top-K, count, histogram, samples
WORKING_BYTES = 512 * 2**20
GB = 2**30


def model_parameters(cfg) -> int:
    """All parameters of a transformer-lens model config: the blocks' weights (n_params), their biases and norm
    weights, the embeddings and the unembedding (with its bias)."""
    d, layers, heads = cfg.d_model, cfg.n_layers, cfg.n_heads
    kv = getattr(cfg, "n_key_value_heads", None) or heads  # grouped-query attention: fewer K and V heads
    vocab_out = cfg.d_vocab_out if getattr(cfg, "d_vocab_out", -1) > 0 else cfg.d_vocab
    embed = cfg.d_vocab * d + vocab_out * (d + 1)
    pos = cfg.n_ctx * d if cfg.positional_embedding_type == "standard" else 0
    # transformer-lens' n_params counts K and V with every head (measured on the Llama fixture: 20,480 over)
    gqa = 2 * layers * (heads - kv) * cfg.d_head * d
    biases = layers * ((heads + 2 * kv) * cfg.d_head + 2 * d + (cfg.d_mlp or 0))
    per_norm = {"LN": 2 * d, "RMS": d}.get(cfg.normalization_type or "", 0)
    return int(cfg.n_params) - gqa + embed + pos + biases + (2 * layers + 1) * per_norm


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    load_peak: int  # weights + the float32 Hugging Face copy held while converting
    saes: int
    scan_state: int

    @property
    def total(self) -> int:
        return max(self.load_peak, self.weights + self.saes + self.scan_state + WORKING_BYTES)

    def describe(self) -> str:
        return (f"~{self.total / GB:.1f} GB (model {self.weights / GB:.1f} GB, {self.load_peak / GB:.1f} GB while "
                f"loading; SAEs {self.saes / GB:.2f} GB; scan state {self.scan_state / GB:.2f} GB)")


def estimate(cfg, sae_shapes: list[tuple[int, int]], dtype: torch.dtype) -> MemoryEstimate:
    """cfg: a transformer-lens config; sae_shapes: (d_in, d_sae) of each SAE; dtype: the load dtype."""
    size = torch.empty(0, dtype=dtype).element_size()
    weights = model_parameters(cfg) * size
    saes = sum((2 * d_in * d_sae + d_sae + d_in) * size for d_in, d_sae in sae_shapes)
    return MemoryEstimate(
        weights=weights,
        load_peak=weights + model_parameters(cfg) * 4,
        saes=saes,
        scan_state=sum(d_sae for _, d_sae in sae_shapes) * SCAN_BYTES_PER_FEATURE,
    )


def available(device: str, n_devices: int = 1) -> int | None:
    """Free bytes on the device(s): CUDA's free memory summed over n_devices, or the CPU's MemAvailable (Linux);
    None when it cannot be read (then nothing is refused)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        first = torch.device(device).index or 0
        return sum(torch.cuda.mem_get_info(first + i)[0] for i in range(n_devices))
    meminfo = Path("/proc/meminfo")
    if device == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fits(est: MemoryEstimate, device: str, n_devices: int, model_name: str, dtype: torch.dtype) -> None:
    """LoadError naming what to pass when the estimate exceeds 90% of what is free."""
    free = available(device, n_devices)
    if free is None or est.total <= 0.9 * free:
        return
    hints = []
    if dtype == torch.float32:
        hints.append("--dtype bfloat16 (halves the weights)")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need = int(est.total // (0.9 * free / n_devices)) + 1
        if need <= count and need > n_devices:
            hints.append(f"--n-devices {need} (this box has {count} GPUs)")
    hints.append("a smaller model or SAE")
    where = f"{n_devices} x {device}" if n_devices > 1 else device
    raise LoadError(f"model {model_name} with its SAEs needs {est.describe()}, but {where} has {free / GB:.1f} GB "
                    f"free: pass {', or '.join(hints)}")
