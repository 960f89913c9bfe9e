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


LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Where a stage config names a compute dtype (dotted keys; a key a stage lacks is skipped).
DTYPE_KEYS = ("model.dtype", "rollout.dtype", "train.autocast")
SLOW_DTYPE_FACTOR = 4.0  # warn when a dtype's matrix products run this many times slower than float32's


def _lookup(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
        if cfg is None:
            return None
    return cfg


def _gpu_requested(cfg) -> bool:
    ray = getattr(cfg, "ray", None)
    return bool(getattr(ray, "use_gpu", False) or getattr(ray, "gpus_per_worker", 0)
                or getattr(ray, "gpus_per_engine", 0))


def cpu_isa() -> str:
    """What PyTorch's CPU kernels dispatch to here (DEFAULT, AVX2, AVX512, ...), plus the bf16 instructions seen."""
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        flags = set(open("/proc/cpuinfo").read().split("\nflags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return isa
    extra = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return f"{isa}, " + (" and ".join(extra) if extra else "no AVX512-BF16 or AMX")


def _one_thread_rate(dtype: torch.dtype) -> float:
    """Matrix-product FLOP/s on one thread: two threads on a busy 2-core machine spin against each other (float32 then
    measured 2.4 GFLOP/s instead of 70), one thread is merely slowed in proportion, so the ratio of two dtypes holds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_peak_flops(n=256, repeats=2, trials=3, dtype=dtype)
    finally:
        torch.set_num_threads(threads)


def slow_dtype_warning(cfg, rate=None, factor: float = SLOW_DTYPE_FACTOR) -> str | None:
    """One warning line when the config computes in a 16-bit float that this CPU multiplies far slower than float32.

    A CPU without AVX512-BF16 or AMX (an AVX2 Zen 3, say) has no fast bf16 kernel: PyTorch's bf16 matrix product
    there ran at 1.2 GFLOP/s against float32's 55 on the same core, so a bf16 setting copied from a faster machine
    makes every pass ~45x slower. Measured, not guessed from CPU flags: two short products per dtype (~0.2 s in all at
    that rate), and nothing at all when every dtype is float32 or the run is on GPUs. ``rate(dtype) -> FLOP/s`` is the
    measurement (default: ``matmul_peak_flops`` on 256x256 matrices, one thread)."""
    settings = [(key, value) for key in DTYPE_KEYS if (value := _lookup(cfg, key)) in LOW_PRECISION]
    if not settings or _gpu_requested(cfg) or torch.cuda.is_available():
        return None
    rate = rate or _one_thread_rate
    f32 = rate(torch.float32)
    slow = []
    for name in dict.fromkeys(value for _, value in settings):
        low = rate(LOW_PRECISION[name])
        if low * factor < f32:
            slow.append(f"{name} at {low / 1e9:.1f} GFLOP/s against float32's {f32 / 1e9:.1f} "
                        f"({f32 / max(low, 1.0):.0f}x slower)")
    if not slow:
        return None
    keys = ", ".join(f"{key}={value}" for key, value in settings)
    return (f"{keys}: this CPU ({cpu_isa()}) multiplies {'; '.join(slow)}, so this run will be about that much "
            "slower than in float32. Set these keys to float32 (or leave them out) on this machine.")
