"""Tiny random LLaVA and Qwen2-VL saved to a folder that both vLLM and transformers load (no download).

vLLM's CPU attention needs a head size of 32 or more, so the language models are 128 wide (4 heads of 32).
Two layout fixes for vLLM 0.32: the LLaVA CLIP tower's weights are renamed to the hub layout
(``vision_tower.vision_model.*``, which transformers 5 saves flat), and the Qwen2-VL processor gets a real
video processor (vLLM's processor wants one; it needs torchvision, which the vLLM test venv has).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

HIDDEN = 128
IMAGE_SIZE = 32  # both towers take it unresized, so vLLM's torchvision processors and the PIL ones agree


def image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save_llava(folder: Path) -> Path:
    from mitigate.builtin import tiny_llava

    model = tiny_llava.build_model(0, hidden_size=HIDDEN)
    model.save_pretrained(folder)
    tiny_llava.build_processor().save_pretrained(folder)
    path = folder / "model.safetensors"
    weights = load_file(path)
    prefix = "vision_tower."
    weights = {
        (f"{prefix}vision_model.{k[len(prefix) :]}" if k.startswith(prefix) else k): v
        for k, v in weights.items()
    }
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def save_qwen2_vl(folder: Path) -> Path:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from mitigate.builtin import tiny_qwen2_vl as q
    from mitigate.builtin.tiny_common import finish, token_id

    config = q.build_config(hidden_size=HIDDEN)
    # M-RoPE sections are frequency pairs of one head: (t, h, w) must add up to head_dim / 2 = 16
    config.text_config.rope_parameters["mrope_section"] = [4, 6, 6]
    tokenizer = q.build_tokenizer()
    model = finish(
        Qwen2VLForConditionalGeneration, config, q.NAME, 0, 0.15, "model.language_model",
        pad_id=token_id(tokenizer, q.PAD), eos_id=token_id(tokenizer, q.IM_END),
    )  # fmt: skip
    model.save_pretrained(folder)
    video = Qwen2VLVideoProcessor(patch_size=q.PATCH_SIZE, merge_size=q.MERGE, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=q.build_image_processor(), tokenizer=tokenizer, video_processor=video,
        chat_template=q.CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(folder)
    return folder


def load_hf(folder: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)
