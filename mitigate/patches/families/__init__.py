"""One module per model family; :data:`ADAPTERS` lists them for
:func:`mitigate.patches.adapters.find_adapter`.

Where two adapters share a config class (PaliGemma and PaliGemma 2), their ``matches`` tell the configs
apart; the order is the one ``mitigate families`` prints.
"""

from __future__ import annotations

from ..adapters import Adapter
from .gemma import Gemma3Adapter, Gemma4Adapter, PaliGemma2Adapter, PaliGemmaAdapter
from .idefics import Idefics3Adapter, SmolVLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter
from .mistral import Mistral3Adapter
from .qwen import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3_5Adapter, Qwen3VLAdapter

ADAPTERS: list[type[Adapter]] = [
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    Qwen3_5Adapter,
    Gemma3Adapter,
    Gemma4Adapter,
    InternVLAdapter,
    SmolVLMAdapter,
    Idefics3Adapter,
    PaliGemmaAdapter,
    PaliGemma2Adapter,
    Mistral3Adapter,
]

__all__ = ["ADAPTERS"]
