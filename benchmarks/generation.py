"""End-to-end generation speed: vanilla vs mitigated, in the modes users run, on a random model with real
LLaVA-1.5-7B shapes (no weights are downloaded).

    python benchmarks/generation.py --device cuda                       # bf16, dynamic and static modes
    python benchmarks/generation.py --device cuda --modes static --layers 16
    python benchmarks/generation.py                                     # CPU: the built-in tiny model

Modes: ``dynamic`` is ``generate`` with the default dynamic cache, eagerly; ``static`` is
``cache_implementation="static"`` with transformers' compiled forward (``torch.compile``, inductor,
``mode="reduce-overhead"``: CUDA graphs) on CUDA. Every configuration (vanilla, each method, PAI+VAR+VHR)
runs once per round, rounds interleaved, and the report gives medians: prefill ms (a one-token answer),
decode ms per token (``(t_N - t_1) / (N - 1)``), peak memory, and, in dynamic mode, the top-level aten
ops of one eager decode step. Ratios are to vanilla in the same mode. Writes JSON, a Markdown table and a
PNG to ``benchmarks/results/`` (or ``--out``). Never asserts on time.

Random weights have no massive activations, so VAR's threshold is lowered for its edit to run, and
GIFT's word filter is off (no tokenizer); everything else is the default preset.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    CompileConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mitigate import apply_mitigation

RESULTS = Path(__file__).parent / "results"
VAR = {"sink_dims": "auto", "tau": 3.0, "min_image_mass": 0.05}
METHODS: dict[str, dict] = {
    "var": {"var": VAR},
    "gift": {"gift": {"pos_filter": False}},
    "vhr": {"vhr": {}},
    "paint": {"paint": {}},
    "pai": {"pai": {}},
    "vaf": {"vaf": {}},
    "pai+var+vhr": {"pai": {}, "var": VAR, "vhr": {}},
}


def llava_7b_shapes(layers: int) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=32000, vision_feature_layer=-2)


def build(device: torch.device, dtype: torch.dtype, layers: int):
    if device.type == "cpu":
        from mitigate.builtin.tiny_llava import build_model

        model = build_model().to(dtype)
        return model.eval(), 16, 32, model.config.image_token_id
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(llava_7b_shapes(layers))
    torch.set_default_dtype(previous)
    return model.eval(), 576, 336, 32000


def inputs_for(batch, prefix, image_tokens, suffix, image_size, image_id, vocab, device, dtype):
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(5, vocab, (batch, prefix + suffix), generator=gen)
    text[text == image_id] = 5
    image = torch.full((batch, image_tokens), image_id)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text[:, :prefix], image, text[:, prefix:]], 1)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_seconds(model, inputs, tokens: int, extra: dict, device: torch.device) -> float:
    settings = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, **extra}
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, **settings)
    sync(device)
    return time.perf_counter() - start


def peak_memory(model, inputs, tokens: int, extra: dict, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    generate_seconds(model, inputs, tokens, extra, device)
    return torch.cuda.max_memory_allocated(device)


def decode_ops(model, inputs) -> int:
    """Top-level aten ops of one eager decode step with a dynamic cache (counted, not timed)."""
    from torch.profiler import ProfilerActivity, profile

    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(**inputs, position_ids=positions, use_cache=True)
        step = dict(
            input_ids=out.logits[:, -1].argmax(-1)[:, None],
            attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
            position_ids=positions[:, -1:] + 1,
            cache=out.cache,
            use_cache=True,
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**step)
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


class Config:
    """One configuration of the comparison: vanilla or a mitigation, applied around each measurement."""

    def __init__(self, name: str, spec: dict | None, kernel: str):
        self.name, self.spec, self.kernel = name, spec, kernel

    def __enter__(self):
        self.handle = (
            None if self.spec is None else apply_mitigation(self.model, self.spec, kernel=self.kernel)
        )
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


def run_mode(model, inputs, mode: str, configs: list[Config], args, device) -> dict:
    extra: dict = {}
    if mode == "static":
        mode = None if args.compile_mode == "none" else args.compile_mode
        compile_config = CompileConfig(backend=args.compile_backend, mode=mode, fullgraph=True)
        if device.type != "cuda":
            compile_config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": compile_config}
    times: dict[str, dict[str, list[float]]] = {c.name: {"prefill": [], "answer": []} for c in configs}
    out: dict[str, dict] = {c.name: {} for c in configs}
    for config in configs:  # warm-up (and compilation): not timed
        with config:
            generate_seconds(model, inputs, args.new_tokens, extra, device)
            generate_seconds(model, inputs, 1, extra, device)
            out[config.name]["peak_bytes"] = peak_memory(model, inputs, args.new_tokens, extra, device)
            if mode == "dynamic":
                out[config.name]["decode_ops"] = decode_ops(model, inputs)
    for _ in range(args.rounds):  # interleaved: every configuration once per round
        for config in configs:
            with config:
                times[config.name]["prefill"].append(generate_seconds(model, inputs, 1, extra, device))
                times[config.name]["answer"].append(
                    generate_seconds(model, inputs, args.new_tokens, extra, device)
                )
    for name, measured in times.items():
        prefill = statistics.median(measured["prefill"])
        answer = statistics.median(measured["answer"])
        decode = (answer - prefill) / (args.new_tokens - 1)
        out[name].update(prefill_ms=1e3 * prefill, decode_ms_per_token=1e3 * decode)
        out[name]["spread"] = {
            "prefill_ms": [1e3 * min(measured["prefill"]), 1e3 * max(measured["prefill"])],
            "answer_ms": [1e3 * min(measured["answer"]), 1e3 * max(measured["answer"])],
        }
    base = out["vanilla"]
    for value in out.values():
        value["prefill_vs_vanilla"] = value["prefill_ms"] / base["prefill_ms"]
        value["decode_vs_vanilla"] = value["decode_ms_per_token"] / base["decode_ms_per_token"]
        if value.get("peak_bytes") and base.get("peak_bytes"):
            value["memory_vs_vanilla"] = value["peak_bytes"] / base["peak_bytes"]
        if "decode_ops" in value:
            value["decode_ops_added"] = value["decode_ops"] - base["decode_ops"]
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Generation: {report['model']}, {report['dtype']}, {report['new_tokens']} new tokens",
        "",
        f"{report['device']}; torch {report['torch']}; transformers {report['transformers']}; "
        f"kernel {report['kernel']}; {report['rounds']} interleaved rounds, medians.",
        "",
        "| mode | batch | configuration | prefill ms (x vanilla) | decode ms/token (x vanilla) | peak memory "
        "(x vanilla) | decode ops added |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        for name, v in row["configs"].items():
            memory = f"x{v['memory_vs_vanilla']:.3f}" if "memory_vs_vanilla" in v else "-"
            ops = str(v.get("decode_ops_added", "-"))
            lines.append(
                f"| {row['mode']} | {row['batch']} | {name} "
                f"| {v['prefill_ms']:.1f} (x{v['prefill_vs_vanilla']:.2f}) "
                f"| {v['decode_ms_per_token']:.2f} (x{v['decode_vs_vanilla']:.2f}) | {memory} | {ops} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = report["results"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        names = [n for n in row["configs"] if n != "vanilla"]
        ax.bar(names, [row["configs"][n]["decode_vs_vanilla"] for n in names], color="tab:blue")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.05, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_title(f"{row['mode']}, batch {row['batch']}: decode vs vanilla")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument(
        "--modes",
        nargs="*",
        default=None,
        choices=["dynamic", "static"],
        help="default: both on CUDA, dynamic on CPU",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="'none' for non-inductor backends")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (the .md and .png go beside it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.modes is None:
        args.modes = ["dynamic", "static"] if device.type == "cuda" else ["dynamic"]
    torch._dynamo.config.cache_size_limit = 64  # one graph per configuration and batch size
    model, image_tokens, image_size, image_id = build(device, dtype, args.layers)
    vocab = model.config.text_config.vocab_size
    configs = [Config("vanilla", None, args.kernel)]
    configs += [
        Config(n, s, args.kernel) for n, s in METHODS.items() if args.methods is None or n in args.methods
    ]
    for config in configs:
        config.model = model
    import transformers

    from mitigate.kernels import resolve_kernel

    results: list[dict] = []
    report = {
        "benchmark": "generation, random model",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernel": resolve_kernel(args.kernel, device),
        "model": "LLaVA-1.5-7B shapes, random weights" if device.type == "cuda" else "builtin:tiny-llava",
        "layers": args.layers if device.type == "cuda" else model.config.text_config.num_hidden_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "compile": {"backend": args.compile_backend, "mode": args.compile_mode},
        "method_params": METHODS,
        "results": results,
    }
    out = args.out or RESULTS / f"generation-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        for batch in args.batch:
            inputs = inputs_for(batch, 34, image_tokens, 40, image_size, image_id, vocab, device, dtype)
            row = {"mode": mode, "batch": batch, "prompt_tokens": int(inputs["input_ids"].shape[1])}
            row["configs"] = run_mode(model, inputs, mode, configs, args, device)
            results.append(row)
            for name, v in row["configs"].items():
                print(
                    f"{mode:>7} batch {batch:>2} {name:>12}: prefill {v['prefill_ms']:8.1f} ms "
                    f"(x{v['prefill_vs_vanilla']:.2f})  decode {v['decode_ms_per_token']:7.2f} ms/token "
                    f"(x{v['decode_vs_vanilla']:.2f})",
                    flush=True,
                )
            # after every row: a run stopped by a time budget keeps what it measured
            out.write_text(json.dumps(report, indent=2) + "\n")
            out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} (+ .md, .png)")


if __name__ == "__main__":
    main()
