"""Throughput and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def matmul_peak_flops(n: int = 1024, repeats: int = 4, trials: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Matrix-multiply FLOP/s measured in this process at the training dtype: the denominator of MFU on a
    CPU with no spec sheet. The median of several short trials, so one preempted trial does not skew it."""
    import statistics

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        rates.append(2 * n**3 * repeats / (time.perf_counter() - t0))
    return statistics.median(rates)


@dataclass
class FlopCounter:
    """Training FLOPs per token from parameter counts (attention scores ignored; Kaplan et al. 2020).

    forward 2N, backward w.r.t. activations 2N, backward w.r.t. weights 2N_trainable:
    6N for full fine-tuning, about 4N for LoRA where the frozen weights get no gradient.
    """

    total_params: int
    trainable_params: int

    @property
    def per_token(self) -> float:
        return 4.0 * self.total_params + 2.0 * self.trainable_params

    def mfu(self, tokens: float, seconds: float, peak_flops: float) -> float:
        if seconds <= 0 or not peak_flops or peak_flops != peak_flops:
            return float("nan")
        return self.per_token * tokens / seconds / peak_flops
