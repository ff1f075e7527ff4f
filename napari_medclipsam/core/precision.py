"""Numeric precision of the heavy forward passes: bf16 autocast where the hardware has it.

``precision`` is ``"auto"`` (bf16 where supported, else fp32), ``"bf16"`` or ``"fp32"``.
bf16 runs the CLIP vision tower during M2IB and the SAM / SAM 2 image encoders (and SAM 2's
memory attention during propagation) under :func:`torch.autocast`; parameters, the M2IB
bottleneck's ``alpha`` and its optimiser stay float32, and cached image embeddings are cast
back to float32 so prompt decoding is always fp32.

Where bf16 is supported: CUDA devices that report ``torch.cuda.is_bf16_supported()``, and CPUs
with native bf16 arithmetic (``avx512_bf16`` or AMX, as torch reports them). Elsewhere torch
would emulate bf16, which is slower than fp32, so ``auto`` keeps fp32 there. Agreement with
fp32 (saliency correlation, Dice of the coarse and SAM masks) is measured in
``benchmarks/bench_precision.py`` and recorded in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

PRECISIONS = ("auto", "bf16", "fp32")


def bf16_supported(device: str) -> bool:
    """Whether ``device`` runs bf16 natively (fast), not emulated."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        cpu = getattr(torch, "cpu", None)
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            check = getattr(cpu, probe, None)
            if check is not None:
                try:
                    if check():
                        return True
                except RuntimeError:  # pragma: no cover - probe unavailable in this build
                    continue
        return False
    return False  # MPS: autocast to bf16 is not reliably faster there


def resolve_precision(precision: str | None, device: str) -> str:
    """``"bf16"`` or ``"fp32"`` for ``precision`` on ``device``.

    Raises
    ------
    ValueError
        Unknown precision, or ``"bf16"`` asked for on a device that cannot run it.
    """
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got "
                         f"{precision!r}.")
    if precision == "fp32":
        return "fp32"
    supported = bf16_supported(device)
    if precision == "bf16" and not supported:
        kind = str(device).split(":")[0]
        if kind == "mps":
            raise ValueError("precision bf16 is not offered on MPS; use fp32 (or auto).")
        if kind == "cuda":
            raise ValueError(f"{device} has no bf16 support; use fp32 (or auto).")
        # CPUs without native bf16 would emulate it: correct, only slower; allow it
        return "bf16"
    return "bf16" if supported else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: str) -> Iterator[None]:
    """``torch.autocast`` to bf16 when ``precision`` is ``"bf16"``; a no-op for ``"fp32"``.

    ``precision`` must already be resolved (:func:`resolve_precision`).
    """
    import torch

    if precision != "bf16":
        yield
        return
    kind = str(device).split(":")[0]
    with torch.autocast(device_type=kind if kind in ("cuda", "cpu") else "cpu",
                        dtype=torch.bfloat16):
        yield
