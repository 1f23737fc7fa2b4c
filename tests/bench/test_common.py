"""Timing helpers of speedsd.bench.common on CPU."""

import time

import pytest
import torch

from speedsd.bench import common


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (perf_counter)")
def test_back_to_back_ms_is_per_call_over_runs():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = common.back_to_back_ms(fn, calls=4, runs=3, warmup=2)
    assert len(calls) == 2 + 4 * 3
    assert 1.9 <= ms < 20  # per call, not per run of 4 (8+ ms)
