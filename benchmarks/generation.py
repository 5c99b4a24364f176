"""End-to-end generation speed: vanilla vs mitigated, on a random model with real LLaVA-1.5-7B shapes.

    python benchmarks/generation.py --device cuda               # LLaVA-1.5-7B shapes, bf16 (random weights)
    python benchmarks/generation.py                             # CPU: the built-in tiny model

No weights are downloaded: the model is random, with VAR's sink threshold lowered so that its edits
really run (with random weights no activation is massive). Reports latency of a prefill (one new token)
and of a full answer, tokens per second, and each method/kernel's ratio to vanilla SDPA generation in
the same run, plus eager attention (what the released implementations require) for context.
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
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mitigate import apply_mitigation

RESULTS = Path(__file__).parent / "results"
# Random weights have no massive activations: VAR's threshold is lowered so that its edit runs. GIFT's
# word filter needs a tokenizer, which the random model has not. Everything else is the default preset.
METHODS: dict[str, dict] = {
    "var": {"sink_dims": "auto", "tau": 3.0, "min_image_mass": 0.0},
    "gift": {"pos_filter": False},
    "vhr": {},
    "paint": {},
    "pai": {},
    "vaf": {},
    "pai+var+vhr": {},
}


def llava_7b_shapes(layers: int) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=32000, vision_feature_layer=-2)


def build(device: torch.device, dtype: torch.dtype, layers: int):
    if device.type == "cpu":
        from mitigate.builtin.tiny_llava import build_model

        model = build_model().to(dtype)
        image_tokens, image_size, image_id = 16, 32, model.config.image_token_id
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlavaForConditionalGeneration(llava_7b_shapes(layers))
        torch.set_default_dtype(previous)
        image_tokens, image_size, image_id = 576, 336, 32000
    return model.eval(), image_tokens, image_size, image_id


def inputs_for(batch, prefix, image_tokens, suffix, image_size, image_id, vocab, device, dtype):
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(5, vocab, (batch, prefix + suffix), generator=gen)
    text[text == image_id] = 5
    image = torch.full((batch, image_tokens), image_id)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), text[:, :prefix], image, text[:, prefix:]], dim=1
    )
    pixels = torch.randn(batch, 3, image_size, image_size, generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def timed(model, inputs, new_tokens, repeats, device) -> float:
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    times = []
    with torch.no_grad():
        model.generate(**inputs, **settings)  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model.generate(**inputs, **settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="*", default=[1])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", nargs="*", default=["torch", "reference"])
    parser.add_argument("--methods", nargs="*", default=None, help="subset of the METHODS keys")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, image_tokens, image_size, image_id = build(device, dtype, args.layers)
    vocab = model.config.text_config.vocab_size
    rows = []
    for batch in args.batch:
        inputs = inputs_for(batch, 34, image_tokens, 40, image_size, image_id, vocab, device, dtype)
        entry: dict = {"batch": batch, "prompt_tokens": int(inputs["input_ids"].shape[1])}

        def measure(label: str, inputs=inputs, entry=entry, batch=batch) -> None:
            prefill = timed(model, inputs, 1, args.repeats, device)
            answer = timed(model, inputs, args.new_tokens, args.repeats, device)
            entry[label] = {
                "prefill_s": prefill,
                "answer_s": answer,
                "tokens_per_s": batch * args.new_tokens / answer,
            }

        measure("vanilla")
        if device.type == "cuda":
            model.set_attn_implementation({"text_config": "eager"})
            measure("vanilla-eager")
            model.set_attn_implementation({"text_config": "sdpa"})
        for method, params in METHODS.items():
            if args.methods is not None and method not in args.methods:
                continue
            spec = method.split("+") if "+" in method else method
            if "+" in method:
                params = {"var": METHODS["var"], "pai": {}, "vhr": {}}
            for kernel in args.kernels if method == "var" else args.kernels[:1]:
                handle = (
                    apply_mitigation(model, spec, kernel=kernel, **({} if "+" in method else params))
                    if ("+" not in method)
                    else apply_mitigation(model, params, kernel=kernel)
                )
                with torch.no_grad(), handle.recording() as stats:
                    model.generate(**inputs, max_new_tokens=4, do_sample=False)
                edited = {
                    name: sum(v.get("edited_rows", 0) for v in layers.values())
                    for name, layers in stats.summary().items()
                }
                measure(f"{method}-{kernel}")
                entry[f"{method}-{kernel}"]["edited_rows_in_4_tokens"] = edited
                handle.remove()
        measure("vanilla-again")  # the spread of the two vanilla runs shows the timing noise
        first, again = entry["vanilla"], entry["vanilla-again"]
        base = {k: (first[k] + again[k]) / 2 for k in ("prefill_s", "answer_s")}
        for value in entry.values():
            if isinstance(value, dict):
                value["prefill_vs_vanilla"] = value["prefill_s"] / base["prefill_s"]
                value["answer_vs_vanilla"] = value["answer_s"] / base["answer_s"]
        rows.append(entry)
        for label, value in entry.items():
            if isinstance(value, dict):
                print(
                    f"batch {batch:>2} {label:>16}: prefill {value['prefill_s'] * 1e3:8.1f} ms "
                    f"(x{value.get('prefill_vs_vanilla', 1.0):.2f})  answer {value['answer_s']:7.3f} s "
                    f"(x{value.get('answer_vs_vanilla', 1.0):.2f})  {value['tokens_per_s']:7.1f} tok/s"
                )
    report = {
        "benchmark": "generation, random model",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "LLaVA-1.5-7B shapes, random weights" if device.type == "cuda" else "builtin:tiny-llava",
        "layers": args.layers if device.type == "cuda" else model.config.text_config.num_hidden_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": args.new_tokens,
        "method_params": METHODS,
        "results": rows,
    }
    out = args.out or RESULTS / f"generation-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
