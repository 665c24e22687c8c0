"""Numeric precision, shared by training and serving (imports torch only).

``precision`` is ``auto`` (bf16 autocast where the hardware runs bf16 natively: a GPU that
supports it, or a CPU with AMX / AVX512-BF16), ``bf16`` or ``fp32``.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': choose auto, bf16 or fp32")
    return precision


def cpu_supports_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls/convs are native and fast."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve_bf16(precision: str) -> bool:
    """Whether ``precision`` means bf16 autocast on this machine."""
    check_precision(precision)
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for inference (``torch.bfloat16``), or None for plain fp32."""
    return torch.bfloat16 if resolve_bf16(precision) else None
