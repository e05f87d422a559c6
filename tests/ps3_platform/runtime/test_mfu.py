"""MFU's denominator: the pool's GPU peak from the pod environment, else the device-name table."""

from __future__ import annotations

import torch

from ps3_platform.runtime.trainer import _peak_flops
from ps3_platform.spec.pools import PEAK_TFLOPS_ENV


def test_peak_comes_from_the_pool(monkeypatch):
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "989")
    assert _peak_flops(torch.device("cpu")) == 989e12


def test_without_a_pool_peak_the_table_answers(monkeypatch):
    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    assert _peak_flops(torch.device("cpu")) == 1e11
