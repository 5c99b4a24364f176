"""``tiny-gemma4``: a tiny random Gemma 4 (``Gemma4ForConditionalGeneration``), built from configs offline.

- Paths: ``model.model`` (``Gemma4Model``), ``.language_model`` (``Gemma4TextModel``),
  ``.layers[i].self_attn`` (``Gemma4TextAttention``: ``layer_idx``, ``is_causal``, ``sliding_window`` on
  sliding layers, ``scaling = 1.0`` because q and k are RMS-normed; full layers may have a larger
  ``head_dim`` (``global_head_dim``) and, with ``attention_k_eq_v``, values equal to keys); vision tower
  ``model.model.vision_tower`` (``Gemma4VisionModel``: patches with 2-D position ids, no CLS, the last
  layer pooled k x k by position), then ``model.model.embed_vision`` (norm + linear).
- Image span: ``<|image>`` (boi) + n x ``<|image|>`` (``config.image_token_id``) + ``<image|>`` (eoi);
  the processor expands the template's ``<|image|>``. n is per image (aspect-preserving resize to at most
  ``max_soft_tokens`` pooled tokens), so rows differ. ``pixel_values [n_images, max_patches, 3*P*P]``
  (padded patches) and ``image_position_ids [n_images, max_patches, 2]`` (-1 = padding);
  ``mm_token_type_ids`` 1 on image tokens.
- Masks: with ``use_bidirectional_attention="vision"`` (large Gemma 4) and ``mm_token_type_ids`` given,
  *sliding* layers let each image block attend to itself bidirectionally (AND the sliding window); full
  layers stay causal. Without ``mm_token_type_ids`` every mask is causal. 1-D positions.
- Per-layer embeddings (``hidden_size_per_layer_input``, E2B/E4B) and KV sharing: the last
  ``num_kv_shared_layers`` layers reuse the keys/values of the last earlier layer of the same type (no
  ``k_proj``; their cache slot is not written). The tiny model has both. Under ``generate``
  (``logits_to_keep=1``) the shared layers get only the last query row at prefill (S_q = 1, S_k = prompt).
- The vision attention modules also have ``layer_idx``: tell text from vision modules by the language model's
  layers, not by that attribute. ``labels`` arrives in the attention kwargs (None).
"""

from __future__ import annotations

import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig, Gemma4VisionConfig
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from .tiny_common import loader, model_builder, token_id, without_missing_parts, word_tokenizer

NAME = "builtin:tiny-gemma4"
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
TURN, END_TURN = "<|turn>", "<turn|>"
MARKERS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
VIDEO = "<|video|>"
SPECIALS = [PAD, EOS, BOS, UNK, TURN, END_TURN, *MARKERS.values(), VIDEO]
EXTRA_WORDS = ["model"]
PATCH_SIZE = 4
POOLING = 3
MAX_SOFT_TOKENS = 70  # the smallest budget Gemma 4's image processor accepts (70..1120)
SLIDING_WINDOW = 24  # shorter than the prompts, so sliding layers drop keys
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SHARED_KV_LAYERS = 2  # layers 2 and 3 reuse the keys/values of layers 0 and 1

# Gemma 4's turn format: <bos><|turn>user\n...<turn|>\n<|turn>model\n; the image part is <|image|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|turn>{{ 'user' if message['role'] == 'user' else 'model' }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def build_tokenizer():
    return word_tokenizer(
        SPECIALS, pad=PAD, eos=EOS, bos=BOS, unk=UNK, add_bos=True, named=MARKERS, words=EXTRA_WORDS
    )


def build_config(*, hidden_size: int = 64, kv_shared_layers: int = SHARED_KV_LAYERS) -> Gemma4Config:
    tok = build_tokenizer()
    text = Gemma4TextConfig(
        vocab_size=len(tok),
        vocab_size_per_layer_input=len(tok),
        hidden_size_per_layer_input=8,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,  # full layers have wider heads, as Gemma 4's 512 vs 256
        sliding_window=SLIDING_WINDOW,
        use_bidirectional_attention="vision",
        num_kv_shared_layers=kv_shared_layers,
        max_position_embeddings=512,
        pad_token_id=token_id(tok, PAD),
        bos_token_id=token_id(tok, BOS),
        eos_token_id=token_id(tok, EOS),
    )
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=PATCH_SIZE,
        pooling_kernel_size=POOLING,
        position_embedding_size=64,
    )
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=token_id(tok, MARKERS["image_token"]),
        boi_token_id=token_id(tok, MARKERS["boi_token"]),
        eoi_token_id=token_id(tok, MARKERS["eoi_token"]),
        video_token_id=token_id(tok, VIDEO),
        audio_token_id=token_id(tok, MARKERS["audio_token"]),
        boa_token_id=token_id(tok, MARKERS["boa_token"]),
        eoa_token_index=token_id(tok, MARKERS["eoa_token"]),
    )


_build_base = model_builder(
    Gemma4ForConditionalGeneration, build_config, NAME, build_tokenizer, pad=PAD, eos=EOS
)


def build_model(seed: int = 0, *, std: float = 0.15, **config_kwargs) -> Gemma4ForConditionalGeneration:
    """A tiny random Gemma 4; the tower's patch position table (initialised to ones: no spatial identity) is
    re-drawn too."""
    model = _build_base(seed, std=std, **config_kwargs)
    table = model.model.vision_tower.patch_embedder.position_embedding_table
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed + 2)) * 0.5)
    return model


def build_processor() -> Gemma4Processor:
    image_processor = Gemma4ImageProcessorPil(
        patch_size=PATCH_SIZE, pooling_kernel_size=POOLING, max_soft_tokens=MAX_SOFT_TOKENS
    )
    return without_missing_parts(Gemma4Processor)(
        feature_extractor=None,
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        video_processor=None,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MAX_SOFT_TOKENS,
    )


load = loader(build_model, build_processor)
