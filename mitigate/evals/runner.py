"""Batched greedy generation over a list of samples, resumable through the prediction cache.

Generic: a sample is an id, a user prompt and an image loader; the runner applies the model's chat
template, batches with left padding, generates greedily and appends each finished batch to the cache.
Samples already in the cache (same key) are skipped, so a killed run picks up where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..loading import chat_prompt, model_device
from .cache import PredictionCache, digest, record_key
from .coco import SampleError
from .parallel import Shard


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str  # the user's text; the runner wraps it in the model's chat template
    image: Callable[[], Image.Image] | None  # may raise SampleError; None for a text-only prompt


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 16
    do_sample: bool = False  # greedy, as POPE's and CHAIR's reference evaluations
    num_beams: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_key(model: dict[str, Any], methods: dict[str, dict[str, Any]], generation: GenerationConfig) -> str:
    """What makes two answers comparable: the model, the resolved method parameters (the kernel is not
    part of it: kernels give the same numbers) and the generation settings."""
    return digest({"model": model, "methods": methods, "generation": generation.as_dict()})


def _decode(processor: Any, ids: torch.Tensor) -> list[str]:
    tokenizer = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _prompts(processor: Any, samples: list[Sample]) -> dict[str, str]:
    """The exact text each sample's prompt becomes under the model's chat template."""
    return {s.id: chat_prompt(processor, s.prompt, with_image=s.image is not None) for s in samples}


def sample_keys(processor: Any, samples: list[Sample], key: str) -> dict[str, str]:
    """Cache key of each sample's answer under run key ``key``."""
    return {sid: record_key(key, sid, prompt) for sid, prompt in _prompts(processor, samples).items()}


def generate_all(
    model: torch.nn.Module,
    processor: Any,
    samples: list[Sample],
    generation: GenerationConfig,
    cache: PredictionCache,
    *,
    key: str,
    batch_size: int = 8,
    shard: Shard | None = None,
    progress: bool = True,
    desc: str = "generating",
    before: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate the answers of this shard's samples that the cache lacks; returns per-sample errors.
    ``before`` gets the number of answers to generate, before the first one."""
    shard = shard or Shard()
    prompts = _prompts(processor, samples)
    keys = {sid: record_key(key, sid, prompt) for sid, prompt in prompts.items()}
    cache.prepare()  # first: a corrupt line of ours is quarantined, so its sample counts as not done
    done = set(cache.load())
    pending = [s for s in shard.take(samples) if keys[s.id] not in done]
    if before is not None:
        before(len(pending))
    errors: list[dict[str, Any]] = []
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    bar = tqdm(
        total=len(pending),
        desc=desc,
        unit="sample",
        disable=not (progress and shard.main),
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            ready, images = [], []
            for sample in batch:
                try:
                    if sample.image is not None:
                        images.append(sample.image())
                    ready.append(sample)
                except SampleError as error:
                    errors.append({"sample_id": sample.id, "error": str(error)})
            if ready:
                texts = _generate(
                    model, processor, [prompts[s.id] for s in ready], images, generation, device, dtype
                )
                cache.append(
                    [
                        {"key": keys[s.id], "run": key, "sample_id": s.id, "text": t}
                        for s, t in zip(ready, texts, strict=True)
                    ]
                )
            bar.update(len(batch))
    finally:
        bar.close()
    return errors


@torch.inference_mode()
def _generate(model, processor, texts, images, generation, device, dtype) -> list[str]:
    # one image list per row: Gemma 3's processor needs it, LLaVA's accept it
    nested = [[image] for image in images] if images else None
    inputs = processor(images=nested, text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = model.generate(**inputs, **generation.as_dict())
    return _decode(processor, out[:, inputs["input_ids"].shape[1] :])
