"""Roofline: the device's memory bandwidth and matrix throughput, measured once by micro-benchmarks,
and how close a decoding run comes to the memory-bound limit.

One decoding step of a dense LM reads every weight once; at batch 1 it is memory-bound, so
tokens/s can never exceed bandwidth / weight bytes. A verification pass over w tokens costs about
the same until its arithmetic (2 FLOPs per parameter per token) catches up with the weight reads:
the "ridge width" w* = FLOP/s x bytes per parameter / (2 x bandwidth). Below w*, verifying more
tokens per pass is nearly free — the premise of speculative decoding.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import torch

from harness.instrument import synchronize_device


@functools.cache
def measure(device: str, dtype: str = "float32") -> dict:
    """Streaming-read bandwidth (bytes/s) and dense matmul throughput (FLOP/s) of `device` in `dtype`.

    Cached per process: a run measures once. The best of a few repeats is kept, as bandwidth
    benchmarks (STREAM) report, since interference only ever slows a repeat down.
    """
    on_gpu = device.startswith("cuda")
    return {
        "device": device, "dtype": dtype,
        "read_bandwidth_bytes_s": _read_bandwidth(device, (2 if on_gpu else 0.25) * 2**30),
        "matmul_flops_s": _matmul_throughput(device, getattr(torch, dtype), 8192 if on_gpu else 1024),
        "method": "best of 5: sum() over a buffer far larger than the caches; square matmul",
    }


def _best_seconds(device: str, work, repeats: int = 5) -> float:
    work()  # warm-up: allocation, kernel selection
    times = []
    for _ in range(repeats):
        synchronize_device(device)
        start = time.perf_counter()
        work()
        synchronize_device(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _read_bandwidth(device: str, nbytes: float) -> float:
    buffer = torch.ones(int(nbytes) // 4, dtype=torch.float32, device=device)
    seconds = _best_seconds(device, buffer.sum)
    return buffer.numel() * 4 / seconds


def _matmul_throughput(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _best_seconds(device, lambda: a @ b)
    return 2 * n**3 / seconds


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (tied ones once), except an
    untied input embedding table, of which a step reads a single row."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel() * parameter.element_size()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= embedding.numel() * embedding.element_size() - embedding.shape[1] * embedding.element_size()
    return total


def model_roof(model: torch.nn.Module) -> dict:
    unique = {id(p): p for p in model.parameters()}.values()
    mean_element_size = sum(p.numel() * p.element_size() for p in unique) / sum(p.numel() for p in unique)
    return {"weight_bytes_per_token": weight_bytes_per_token(model), "bytes_per_parameter": mean_element_size}


def efficiency(device_roof: dict, model: dict, decode_tokens_per_s: float) -> dict:
    """The memory-bound limit for `model` on the device, and the fraction of it a run reached."""
    limit = device_roof["read_bandwidth_bytes_s"] / model["weight_bytes_per_token"]
    ridge = device_roof["matmul_flops_s"] * model["bytes_per_parameter"] / (2 * device_roof["read_bandwidth_bytes_s"])
    return {
        "memory_bound_tokens_per_s": limit,
        "measured_tokens_per_s": decode_tokens_per_s,
        "fraction": decode_tokens_per_s / limit if limit > 0 and not math.isnan(decode_tokens_per_s) else math.nan,
        "ridge_width": ridge,
    }


def decode_tokens_per_s(records: list[dict]) -> float:
    """Mean decode-phase tokens/s (the prefill pass and the token it yields left out) over records."""
    rates = [(r["new_tokens"] - 1) / r["decode_s"] for r in records
             if r.get("decode_s") and r.get("new_tokens", 0) > 1 and not r.get("error")]
    return statistics.fmean(rates) if rates else math.nan
