"""``tiny-mistral3``: a tiny random Mistral 3 (``Mistral3ForConditionalGeneration``, Pixtral vision tower).

- Paths: ``model.model`` (``Mistral3Model``), ``.language_model`` (``MistralModel``), ``.layers[i].self_attn``
  (``MistralAttention``: ``layer_idx``, ``is_causal``, ``scaling``, ``sliding_window`` from the config,
  None for Mistral Small 3.x); vision tower ``model.model.vision_tower`` (``PixtralVisionModel``: 2-D RoPE,
  no CLS, images of any size attend within themselves, ``.transformer.layers[i].attention``), then
  ``model.model.multi_modal_projector`` (a learned 2x2 patch merger, then an MLP).
- Image span: a grid of h rows x w columns of ``[IMG]`` (``config.image_token_id``), each row closed by
  ``[IMG_BREAK]``, the last row's by ``[IMG_END]`` instead; h, w = image side / (patch * merge). Features map
  1:1 in row order onto the ``[IMG]`` tokens only. The processor returns ``pixel_values [n_images, 3, H, W]``
  (padded to the largest) and ``image_sizes`` (the resized sizes, which the tower needs).
- transformers 5.24's ``PixtralProcessor`` cannot be imported without torchvision, so the tiny model comes
  with :class:`TinyPixtralProcessor`, which writes the same token layout around the PIL image processor.
- 1-D positions; plain causal masks.
"""

from __future__ import annotations

from transformers import BatchFeature, Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig
from transformers.models.pixtral.configuration_pixtral import PixtralVisionConfig
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from .tiny_common import loader, model_builder, token_id, word_tokenizer

NAME = "builtin:tiny-mistral3"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
INST, END_INST, SYSTEM, END_SYSTEM = "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"
IMAGE, IMAGE_BREAK, IMAGE_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
SPECIALS = [PAD, UNK, BOS, EOS, INST, END_INST, SYSTEM, END_SYSTEM, IMAGE, IMAGE_BREAK, IMAGE_END]
PATCH_SIZE = 4
MERGE = 2
LONGEST_EDGE = 48  # images are resized to at most 48 px, then to whole 8-px tokens

# Mistral Small 3.x: "<s>[INST]{text with [IMG] where the image goes}[/INST]".
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}[IMG]{% endif %}"
    "{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "</s>{% endif %}{% endfor %}"
)


class TinyPixtralProcessor:
    """Images and chat text to model inputs, Pixtral-style: each ``[IMG]`` in the text becomes the image's
    grid of ``[IMG]`` tokens with ``[IMG_BREAK]`` after each row and ``[IMG_END]`` last. Images are given
    per row (a list per prompt) or flat, in the order their placeholders appear."""

    def __init__(
        self, image_processor, tokenizer, chat_template: str, patch_size: int, spatial_merge_size: int
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.token_pixels = patch_size * spatial_merge_size
        self.image_token = IMAGE
        self.image_token_id = token_id(tokenizer, IMAGE)

    def apply_chat_template(
        self, conversation, add_generation_prompt: bool = False, tokenize: bool = False, **kw
    ):
        """The chat text (as processors do, not token ids unless ``tokenize``)."""
        return self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **kw,
        )

    def image_tokens(self, height: int, width: int) -> str:
        rows, cols = height // self.token_pixels, width // self.token_pixels
        grid = ((IMAGE * cols) + IMAGE_BREAK) * rows
        return grid[: -len(IMAGE_BREAK)] + IMAGE_END

    def __call__(self, text=None, images=None, return_tensors: str | None = "pt", padding=True, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, list | tuple):
            images = [images]  # one image, as the real processor accepts
        flat = (
            [im for row in images for im in (row if isinstance(row, list | tuple) else [row])]
            if images
            else []
        )
        counts = [t.count(IMAGE) for t in texts]
        if sum(counts) != len(flat):
            raise ValueError(f"{sum(counts)} {IMAGE} placeholders for {len(flat)} images")
        data = {}
        if flat:
            pixels = self.image_processor(
                flat,
                patch_size={"height": self.token_pixels, "width": self.token_pixels},
                return_tensors="pt",
            )
            sizes = pixels["image_sizes"].tolist()
            spans = iter(self.image_tokens(h, w) for h, w in sizes)
            texts = ["".join(part + (next(spans) if i < len(t.split(IMAGE)) - 1 else "")
                             for i, part in enumerate(t.split(IMAGE))) for t in texts]  # fmt: skip
            data.update(pixels)
        data.update(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def build_tokenizer():
    return word_tokenizer(SPECIALS, pad=PAD, eos=EOS, bos=BOS, unk=UNK, named={"image_token": IMAGE})


def build_config(*, num_layers: int = 4, hidden_size: int = 64) -> Mistral3Config:
    tok = build_tokenizer()
    text = MistralConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=None,
        pad_token_id=token_id(tok, PAD),
        bos_token_id=token_id(tok, BOS),
        eos_token_id=token_id(tok, EOS),
    )
    vision = PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        patch_size=PATCH_SIZE,
        image_size=LONGEST_EDGE,
    )
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id(tok, IMAGE),
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


build_model = model_builder(
    Mistral3ForConditionalGeneration, build_config, NAME, build_tokenizer, pad=PAD, eos=EOS
)


def build_processor() -> TinyPixtralProcessor:
    return TinyPixtralProcessor(
        PixtralImageProcessorPil(size={"longest_edge": LONGEST_EDGE}),
        build_tokenizer(),
        CHAT_TEMPLATE,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE,
    )


load = loader(build_model, build_processor)
