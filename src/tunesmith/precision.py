"""Which numeric precision to train in.

`auto` picks bf16 autocast only where the hardware runs bf16 matrix products fast: CUDA GPUs with
bf16 support, and CPUs with AMX tiles or AVX-512 BF16. Elsewhere bf16 is emulated and far slower
than float32 (measured on an AVX2-only EPYC: 1.3 GFLOP/s bf16 against 170 GFLOP/s float32), so
`auto` keeps float32 there. On a CPU it also keeps float32 for convolutional networks (more weights in
convolutions than in linear layers): their depthwise convolutions and batch norms gain nothing from
AMX and autocast's casts cost more than they save (EfficientNet-Lite0 on a 2-core AMX Xeon,
`benchmarks/bench_images.py`: 87 images/s in float32 against 62 in bf16).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tunesmith.errors import UserError


def cpu_bf16_is_fast() -> bool:
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


def convolutional(model: nn.Module) -> bool:
    """Whether convolutions hold more of the model's weights than linear layers do (a CNN, not a transformer)."""
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return conv > linear


def resolve_precision(requested: str, device: torch.device, model: nn.Module) -> tuple[str, str]:
    """Map the config's precision ('auto' | 'fp32' | 'bf16' | 'fp16') to what the run uses, and why (for `auto`)."""
    if requested == "auto":
        if device.type == "cuda":
            return ("bf16", "") if torch.cuda.is_bf16_supported() else ("fp16", "")
        if device.type == "cpu" and cpu_bf16_is_fast():
            if convolutional(model):
                return "fp32", "auto: a convolutional network trains faster in float32 on a CPU, even with fast bf16"
            return "bf16", "auto: this CPU has fast bf16 matrix products"
        return "fp32", ""
    if requested == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 needs a GPU; on a CPU use 'bf16' or 'fp32' (or 'auto')")
    return requested, ""


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


@contextlib.contextmanager
def linear_weights_cast(model: nn.Module, amp: torch.dtype | None) -> Iterator[int]:
    """For an inference pass of many batches under autocast: the float32 weights and biases of `nn.Linear`
    layers cast to the autocast dtype once for the pass, not at every batch (autocast casts a weight at each
    forward and keeps the cast only for weights that train, within one autocast region). The outputs are bit
    for bit the same: autocast's cast is the same rounding. Inside no_grad only; weights shared with another
    kind of module (an embedding tied to an output layer), empty ones and tensor subclasses (sharded weights)
    are left alone; every weight is restored on exit.
    Measured: the packaged MiniLM's feature pass over 3,600 rows in bf16, 5.5 s -> 4.7 s (docs/benchmarks.md).
    Yields how many tensors were cast."""
    if amp is None or torch.is_grad_enabled():
        yield 0
        return
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m._parameters.values() if p is not None}
    saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for p in (m.weight, m.bias):
                # a plain, non-empty tensor: not a DTensor (FSDP2) nor a ZeRO-3 partition, whose storage their engines manage
                if (p is not None and p.dtype == torch.float32 and type(p.data) is torch.Tensor and p.numel() > 0
                        and id(p) not in shared and id(p) not in saved):
                    saved[id(p)] = (p, p.data)
    try:
        for p, data in saved.values():
            p.data = data.to(amp)
        yield len(saved)
    finally:
        for p, data in saved.values():
            p.data = data
