"""One attention layer with LLaVA-1.5-7B shapes (32 heads, head dim 128) and VAR active: prefill and
decode time and peak memory for vanilla SDPA, the reference kernel, the torch kernel and (on CUDA) the
fused Triton kernel, in one run. Decode runs the plan folded once, as a generation does.

    python benchmarks/attention.py                      # CPU: T = 600, 1200 (reference only where it fits)
    python benchmarks/attention.py --device cuda        # GPU: T = 600, 2900, 8192

Prints a table and writes JSON (with the machine) to benchmarks/results/. Never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from mitigate.kernels.bench import peak_bytes, runner, time_call, var_case

RESULTS = Path(__file__).parent / "results"


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_peak(kernel: str, seq: int, phase: str, args) -> int:
    """Peak RSS of one call in a fresh process (the RSS high-water mark is process-wide)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        "-m",
        "mitigate.kernels.bench",
        "--kernel",
        kernel,
        "--seq",
        str(seq),
        "--phase",
        phase,
    ]
    cmd += [
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--text-after",
        str(args.text_after),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: fp32 on CPU, bf16 on GPU)"
    )
    parser.add_argument("--seq", type=int, nargs="*", default=None)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--text-after", type=int, default=40, help="prompt rows after the image (VAR edits them)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--reference-max-seq", type=int, default=None, help="skip the reference above this T")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    seqs = args.seq or ([600, 2900, 8192] if gpu else [600, 1200])
    repeats = args.repeats or (20 if gpu else 3)
    ref_max = args.reference_max_seq or (8192 if gpu else 1200)
    from mitigate.kernels import triton_available

    kernels = ("vanilla", "reference", "torch", *(("triton",) if gpu and triton_available(device) else ()))

    rows = []
    for seq in seqs:
        for phase in ("prefill", "decode"):

            def build(seq=seq, phase=phase):
                return var_case(
                    seq,
                    phase=phase,
                    heads=args.heads,
                    head_dim=args.head_dim,
                    text_after=args.text_after,
                    dtype=dtype,
                    device=device,
                )

            case = build()
            result = {"seq": seq, "phase": phase}
            for kernel in kernels:
                if kernel == "reference" and seq > ref_max:
                    continue
                seconds = time_call(runner(kernel, case), device, repeats=repeats, warmup=1 if not gpu else 3)
                memory = peak_bytes(kernel, build, device) if gpu else cpu_peak(kernel, seq, phase, args)
                result[kernel] = {"seconds": seconds, "peak_bytes": memory}
            for kernel in kernels[1:]:
                if kernel in result:
                    result[kernel]["time_vs_vanilla"] = (
                        result[kernel]["seconds"] / result["vanilla"]["seconds"]
                    )
                    result[kernel]["memory_vs_vanilla"] = (
                        result[kernel]["peak_bytes"] / result["vanilla"]["peak_bytes"]
                    )
            rows.append(result)
            del case
            if gpu:
                torch.cuda.empty_cache()

    report = {
        "benchmark": "attention layer, VAR active",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"heads": args.heads, "head_dim": args.head_dim, "text_after_image": args.text_after},
        "machine": machine(device),
        "results": rows,
    }
    header = ("T", "phase", "kernel", "time", "x vanilla", "peak MiB", "x vanilla")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 8, 10, 11, 10, 10, 10), strict=True)))
    for row in rows:
        for kernel in kernels:
            if kernel not in row:
                continue
            r = row[kernel]
            print(
                f"{row['seq']:>6} {row['phase']:>8} {kernel:>10} {r['seconds'] * 1e3:>9.3f}ms "
                f"{r.get('time_vs_vanilla', 1.0):>10.2f} {r['peak_bytes'] / 2**20:>10.1f} "
                f"{r.get('memory_vs_vanilla', 1.0):>10.2f}"
            )
    out = args.out or RESULTS / f"attention-{device.type}-{report['dtype']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
