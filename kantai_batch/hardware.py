"""What the machine can do: accelerator, supported precision, peak matmul throughput for MFU."""

from __future__ import annotations

import functools
import logging
import re
import time

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, FLOP/s. Matched by
# substring of torch.cuda.get_device_name(), most specific first.
_GPU_PEAK_BF16 = (
    # Dense bf16 tensor-core FLOP/s from the data sheets (half the "with sparsity" figure), matched on
    # whole words of the device name, the more specific first: "L40" is no "L4", "H100 NVL" no SXM.
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("A10G",), 70e12),
    (("A10",), 125e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("V100",), 125e12),
    (("T4",), 65e12),
)


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_supports_bf16() -> bool:
    """avx512-bf16 or AMX: bf16 matmuls run natively rather than being emulated (which is slower than fp32)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(setting: str) -> str:
    """``auto`` becomes bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32."""
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_attention(setting: str, precision: str) -> str:
    """``auto`` becomes eager on a CPU training in bf16, sdpa elsewhere (``train.attention``).

    torch's fused CPU attention is slower in bf16 than the plain bf16 matmuls of eager attention
    (its backward above all); in fp32 it is the faster, and on a GPU the fused kernels are far ahead.
    """
    import torch

    if setting != "auto":
        return setting
    return "eager" if precision == "bf16" and not torch.cuda.is_available() else "sdpa"


def peak_flops(precision: str) -> tuple[float, str]:
    """The device's peak FLOP/s for ``precision`` and where the number comes from."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        bf16_peak = data_sheet_peak(name)
        if bf16_peak is not None:
            # fp32 without tensor cores is far lower; TF32 is not what fp32 training uses by default.
            return (bf16_peak if precision in ("bf16", "fp16") else bf16_peak / 16), f"data sheet ({name})"
        return _measured_peak(precision), f"measured matmul ({name})"
    return _measured_peak(precision), "measured 2048x2048 matmul on this CPU"


def data_sheet_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (``torch.cuda.get_device_name()``), if known."""
    words = set(re.split(r"[\s_-]+", device_name))
    peak = next((peak for marker, peak in _GPU_PEAK_BF16 if words.issuperset(marker)), None)
    # A MIG slice ("... MIG 3g.40gb") has that many of the card's seven compute slices.
    mig = re.search(r"\bMIG (\d)g\.", device_name)
    return peak * int(mig.group(1)) / 7 if peak is not None and mig else peak


@functools.cache
def _measured_peak(precision: str) -> float:
    """The fastest of repeated large matmuls in ``precision``: what this device actually sustains."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    size = 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def matmul() -> None:
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()

    matmul()  # the first call allocates its output and picks kernels
    peak = 2 * size**3 / fastest_run(matmul)
    log.info("hardware: %s matmul peak measured at %.0f GFLOP/s", precision, peak / 1e9)
    return peak


def fastest_run(
    run, *, min_seconds: float = 0.5, min_repeats: int = 5, max_repeats: int = 100, clock=time.perf_counter
) -> float:
    """Seconds of the fastest of repeated ``run()`` calls spread over at least ``min_seconds``.

    A window rather than a fixed handful: five matmuls that all overlapped another process starting
    up once read 252 instead of ~420 GFLOP/s on a 2-core CPU, and every MFU of that run with it.
    """
    best, started, repeats = float("inf"), clock(), 0
    while repeats < max_repeats and (repeats < min_repeats or clock() - started < min_seconds):
        start = clock()
        run()
        best = min(best, clock() - start)
        repeats += 1
    return best


def training_flops_per_token(config, *, sequence_length: int, scored_fraction: float) -> float:
    """Forward + backward FLOPs per token of a RoBERTa model: 6 x matmul parameters + attention.

    ``scored_fraction`` is the share of positions the LM head runs on (the masked 15% with sparse
    prediction, 1.0 for a dense head). Embedding lookups are not matmuls and do not count.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 2 * hidden * config.intermediate_size
    head = (hidden * hidden + hidden * config.vocab_size) * scored_fraction
    attention = 2 * 2 * layers * sequence_length * hidden  # QK^T and AV per token, forward
    return 6 * (layers * per_layer + head) + 3 * attention
