"""Which numeric precision to train in.

`auto` picks bf16 autocast only where the hardware runs bf16 matrix products fast: CUDA GPUs with
bf16 support, and CPUs with AMX tiles or AVX-512 BF16. Elsewhere bf16 is emulated and far slower
than float32 (measured on an AVX2-only EPYC: 1.3 GFLOP/s bf16 against 170 GFLOP/s float32), so
`auto` keeps float32 there.
"""

from __future__ import annotations

import torch

from tunesmith.errors import UserError


def cpu_bf16_is_fast() -> bool:
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map the config's precision ('auto' | 'fp32' | 'bf16' | 'fp16') to what the run uses."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_bf16_is_fast():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 needs a GPU; on a CPU use 'bf16' or 'fp32' (or 'auto')")
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
