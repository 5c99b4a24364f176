"""Workloads and probes for measuring kernels: LLaVA-shaped attention layers with a VAR edit, wall time,
and peak memory (CUDA allocator on GPU; the process's peak RSS, reset before the call, on CPU).

Used by ``benchmarks/attention.py`` and by the memory test, which runs :func:`main` in a subprocess so
that each measurement starts from a clean high-water mark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..plan import LayerPlan, Rows, VarRule
from . import KernelCall, get_kernel
from .torch_sdpa import sdpa


@dataclass
class Case:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    plan: LayerPlan
    scaling: float
    causal: bool

    @property
    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.key, self.value))


def var_case(
    seq: int,
    *,
    phase: str = "prefill",
    heads: int = 32,
    head_dim: int = 128,
    kv_heads: int | None = None,
    text_after: int = 40,
    image_start: int = 35,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Case:
    """One attention call of a LLaVA-like layer with VAR active: a system prefix, an image span, then
    ``text_after`` text tokens (the rows VAR edits at prefill). BOS and a few image tokens are sinks."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kv_heads = kv_heads or heads
    nq = seq if phase == "prefill" else 1
    image_end = max(image_start + 1, seq - text_after)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    groups = torch.zeros(batch, seq, dtype=torch.long)
    groups[:, image_start:image_end] = VarRule.IMAGE
    groups[:, 0] = VarRule.TEXT_SINK
    sinks = torch.linspace(image_start, image_end - 1, 6).long()
    groups[:, sinks] = VarRule.IMAGE_SINK
    on = torch.ones(batch, dtype=torch.bool, device=device)
    rule = VarRule(
        method="var",
        rows=Rows.where(on, image_end),
        groups=groups.to(device),
        fraction=0.4,
        min_nonsink_ratio=0.5,
        min_image_mass=0.2,
    )
    return Case(
        query=rand(batch, heads, nq, head_dim),
        key=rand(batch, kv_heads, seq, head_dim),
        value=rand(batch, kv_heads, seq, head_dim),
        mask=None,
        plan=LayerPlan.of(0, seq, [rule]),
        scaling=head_dim**-0.5,
        causal=True,
    )


def runner(kernel: str, case: Case) -> Callable[[], torch.Tensor]:
    """A no-argument call of ``kernel`` on ``case``; ``vanilla`` is plain SDPA without the edit. A decode
    case (one query row) runs the plan folded once (``prepare``), as a generation does."""
    if kernel == "vanilla":
        return lambda: sdpa(case.query, case.key, case.value, case.mask, case.scaling, case.causal)
    fn = get_kernel(kernel)
    q, k, v = case.query, case.key, case.value
    if q.shape[2] == 1:
        prepared = fn.prepare(
            case.plan, length=k.shape[2], dtype=q.dtype, num_heads=q.shape[1], num_kv_heads=k.shape[1],
            scaling=case.scaling,
        )  # fmt: skip
        call = KernelCall(scaling=case.scaling, causal=case.causal, past=None)
        return lambda: fn.decode(q, k, v, case.mask, prepared, call)
    call = KernelCall(scaling=case.scaling, causal=case.causal, past=k.shape[2] - q.shape[2], plain_mask=True)
    return lambda: fn.run(q, k, v, case.mask, case.plan, call)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    call: Callable[[], torch.Tensor], device: torch.device, repeats: int = 10, warmup: int = 2
) -> float:
    """Median wall time in seconds."""
    with torch.no_grad():
        for _ in range(warmup):
            call()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak RSS (VmHWM) to the current RSS
        fh.write("5")


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(kernel: str, build: Callable[[], Case], device: torch.device) -> int:
    """Peak memory of building the inputs plus one call: inputs + output + temporaries.

    On CPU, call it in a fresh process (see :func:`main`): the RSS high-water mark is process-wide.
    """
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            case = build()
            runner(kernel, case)()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        # warm the code paths on a small case first, so lazy initialisation is not counted
        small = var_case(64, heads=2, head_dim=8)
        runner(kernel, small)()
        _rss_peak_reset()
        before = _rss("VmRSS")
        case = build()
        runner(kernel, case)()
        return _rss("VmHWM") - before


def main(argv: list[str] | None = None) -> None:
    """``python -m mitigate.kernels.bench --kernel torch --seq 4096 ...``: print one peak-memory probe."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-after", type=int, default=40)
    parser.add_argument("--phase", default="prefill")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)

    def build() -> Case:
        return var_case(
            args.seq,
            phase=args.phase,
            heads=args.heads,
            head_dim=args.head_dim,
            text_after=args.text_after,
            device=device,
        )

    print(json.dumps({"kernel": args.kernel, "peak_bytes": peak_bytes(args.kernel, build, device)}))


if __name__ == "__main__":
    main()
