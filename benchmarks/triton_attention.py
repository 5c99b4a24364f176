"""GPU smoke test and benchmark: the fused grouped-state Triton kernel against SDPA on LLaVA-1.5-7B shapes.

One attention layer, 32 heads, head dim 128, bf16, batch 1. Prefill at T = 600, 2900, 8192 (causal) and
decode (one query row) at Nk = 1100, 8192; the kernel runs with G = 1 (plain) and G = 4 (a VLM layout:
text | image with sparse sinks | text, with a per-key logit scale and bias). Each case first checks that
merging the kernel's sets gives SDPA's output, then times interleaved repeats and keeps the medians.

    python benchmarks/triton_attention.py                 # writes benchmarks/results/triton_attention.json
    python benchmarks/triton_attention.py --no-autotune   # fixed configs (faster to compile)

Needs CUDA (no network); about a minute on an H100. Writes to $OUT/triton_attention.json when OUT is set.
Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

HEADS, HEAD_DIM = 32, 128
PREFILL = (600, 2900, 8192)
DECODE = (1100, 8192)


def vlm_plan(num_keys: int, num_groups: int, device: torch.device) -> dict:
    """Group ids and edits of a LLaVA-like prompt: 35 text keys, the image (576 keys per 600 of prompt),
    a sink every 97 image keys, then text; G = 4 separates the text after the image."""
    if num_groups == 1:
        return {}
    image = min(num_keys - 40, 576 * max(1, num_keys // 600))
    groups = torch.zeros(1, num_keys, dtype=torch.int32, device=device)
    groups[:, 35 : 35 + image] = 1
    groups[:, 35 : 35 + image : 97] = 2
    groups[:, 35 + image :] = 3
    scale = torch.ones(1, 1, num_keys, device=device)
    scale[:, :, 35 : 35 + image] = 1.1
    bias = torch.zeros(1, 1, num_keys, device=device)
    bias[:, :, 35 : 35 + image : 97] = -0.5
    return dict(groups=groups, num_groups=4, logit_scale=scale, logit_bias=bias)


def time_ms(fn: Callable[[], object], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, iters: int) -> dict[str, float]:
    for fn in contenders.values():  # compile, autotune, warm up
        fn()
        fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(time_ms(fn, iters))
    return {name: statistics.median(values) for name, values in samples.items()}


def run(repeats: int, device: torch.device) -> list[dict]:
    from mitigate.kernels.grouped_reference import merge_sets
    from mitigate.kernels.triton_grouped import grouped_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    scaling = HEAD_DIM**-0.5
    rows = []
    cases = [("prefill", t, t) for t in PREFILL] + [("decode", 1, n) for n in DECODE]
    for phase, num_queries, num_keys in cases:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(1, HEADS, n, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
            for n in (num_queries, num_keys, num_keys)
        )
        causal = phase == "prefill"
        iters = 20 if num_keys <= 3000 else 5
        contenders: dict[str, Callable[[], object]] = {
            "sdpa": lambda q=q, k=k, v=v, causal=causal: sdpa(q, k, v, is_causal=causal, scale=scaling)
        }
        errors = {}
        for groups in (1, 4):
            plan = vlm_plan(num_keys, groups, device)

            def call(plan=plan, q=q, k=k, v=v, causal=causal):
                return grouped_attention(q, k, v, scaling=scaling, causal=causal, validate=False, **plan)

            contenders[f"triton_g{groups}"] = call
            if groups == 1:  # smoke: the single set is plain attention
                o, lse = call()
                ref = sdpa(q, k, v, is_causal=causal, scale=scaling).transpose(1, 2).float()
                errors["g1_vs_sdpa"] = (merge_sets(o, lse) - ref).abs().max().item()
        times = interleaved(contenders, repeats, iters)
        row = {"phase": phase, "num_queries": num_queries, "num_keys": num_keys, "max_abs_err": errors}
        row |= {f"{name}_ms": round(ms, 5) for name, ms in times.items()}
        row |= {f"{n}_vs_sdpa": round(ms / times["sdpa"], 3) for n, ms in times.items() if n != "sdpa"}
        rows.append(row)
        print(
            f"{phase:8s} Nq={num_queries:5d} Nk={num_keys:5d}  sdpa {times['sdpa']:.4f} ms  "
            f"G=1 {times['triton_g1']:.4f} ms ({row['triton_g1_vs_sdpa']}x)  "
            f"G=4 {times['triton_g4']:.4f} ms ({row['triton_g4_vs_sdpa']}x)  "
            f"err {errors['g1_vs_sdpa']:.2e}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians are kept)")
    parser.add_argument("--no-autotune", action="store_true", help="fixed kernel configs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/triton_attention.py needs a CUDA GPU (the Triton kernel has no CPU build)")
    try:
        import triton
    except ImportError:
        sys.exit("benchmarks/triton_attention.py needs triton: pip install 'mitigate[triton]'")
    if args.no_autotune:
        os.environ["MITIGATE_TRITON_AUTOTUNE"] = "0"
    device = torch.device("cuda")
    rows = run(args.repeats, device)
    result = {
        "benchmark": "triton_attention",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "autotune": not args.no_autotune,
        "shapes": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "repeats": args.repeats,
        "rows": rows,
    }
    out = args.out
    if out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
        out = base / "triton_attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
