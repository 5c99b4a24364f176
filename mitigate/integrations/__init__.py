"""Mitigation inside other tools: ``attn_implementation="mitigate"`` for transformers (and its
``transformers serve``), and a model for lmms-eval. Each submodule imports its tool only when used."""
