"""Precision: 'auto' follows the hardware's bf16 support, autocast changes what layers return."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from napari_medclipsam.core import precision  # noqa: E402
from napari_medclipsam.core.precision import (  # noqa: E402
    PRECISIONS,
    autocast,
    bf16_supported,
    resolve_precision,
)


def test_auto_on_cpu_follows_bf16_support():
    expected = "bf16" if bf16_supported("cpu") else "fp32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision(None, "cpu") == expected  # None means auto


@pytest.mark.parametrize("supported", [True, False])
def test_auto_uses_bf16_exactly_where_supported(monkeypatch, supported):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: supported)
    assert resolve_precision("auto", "cpu") == ("bf16" if supported else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_fp32_is_always_fp32(device):
    assert resolve_precision("fp32", device) == "fp32"


def test_bf16_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    assert resolve_precision("bf16", "cpu") == "bf16"  # emulated on a CPU: slower, allowed
    with pytest.raises(ValueError, match="MPS"):
        resolve_precision("bf16", "mps")
    with pytest.raises(ValueError, match="no bf16 support"):
        resolve_precision("bf16", "cuda")
    assert not bf16_supported("mps")


@pytest.mark.parametrize("value", ["fp16", "BF16", "half", "float32"])
def test_unknown_precision(value):
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        resolve_precision(value, "cpu")
    assert value not in PRECISIONS


def test_autocast_bf16_and_fp32_on_cpu():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast("bf16", "cpu"):
        low = layer(x)
    with autocast("fp32", "cpu"):
        full = layer(x)
    assert low.dtype == torch.bfloat16
    assert full.dtype == torch.float32 and layer.weight.dtype == torch.float32
    torch.testing.assert_close(low.float(), full, rtol=0.02, atol=0.02)
    assert layer(x).dtype == torch.float32  # nothing left switched on after the block
