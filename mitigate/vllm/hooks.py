"""Where the worker side attaches to vLLM's V1 model runner and model (see :mod:`.worker`).

* the runner: its ``__init__`` (to know it), ``_on_request_state_removed`` (a finished request's edits go),
  ``_dummy_run`` (warm-up forwards see no step), ``_execute_mm_encoder`` and ``_cache_encoder_output`` (the
  vision tower's CLS rows, kept by image identifier);
* the model: a pre-hook on every decoder layer (its input hidden state, for VAR's sinks) and on the vision
  tower's attention in the layers PAINT reads (the CLS query's probabilities, one row per image and head).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import UnsupportedModelError
from . import attention
from .worker import Worker

log = logging.getLogger("mitigate.vllm")


class VisionCapture:
    """CLS rows captured while vLLM runs the vision encoder, handed out image by image in encoding order."""

    def __init__(self):
        self.active = False
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.images: list[dict[int, torch.Tensor]] = []

    def start(self) -> None:
        self.active, self.pending, self.images = True, {}, []

    def add(self, layer: int, rows: torch.Tensor) -> None:
        self.pending.setdefault(layer, []).append(rows)

    def next(self) -> dict[int, torch.Tensor] | None:
        if self.pending:  # every group of this encoder run is done: split by image
            joined = {layer: torch.cat(rows) for layer, rows in self.pending.items()}
            count = min(len(rows) for rows in joined.values())
            self.images += [{layer: rows[i] for layer, rows in joined.items()} for i in range(count)]
            self.pending = {}
        return self.images.pop(0) if self.images else None


CAPTURE = VisionCapture()


def make_worker(runner: Any) -> Worker | None:
    try:
        worker = Worker(runner)
    except UnsupportedModelError as exc:
        log.info("%s", exc)
        return None
    install_model_hooks(worker, runner.get_model())
    return worker


def install_model_hooks(worker: Worker, model: torch.nn.Module) -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index

    decoder = 0
    for module in model.modules():
        attn = getattr(getattr(module, "self_attn", None), "attn", None)
        if isinstance(attn, Attention):
            module.register_forward_pre_hook(
                _hidden_hook(worker, extract_layer_index(attn.layer_name)), with_kwargs=True
            )
            decoder += 1
    if decoder != worker.info.num_layers:
        raise UnsupportedModelError(
            f"mitigate: found {decoder} decoder layers in vLLM's model, expected {worker.info.num_layers}"
        )
    if worker.info.vision_has_cls and worker.info.vision_feature_layer is not None:
        tower = getattr(model.vision_tower, "vision_model", model.vision_tower)
        heads = worker.runner.vllm_config.model_config.hf_config.vision_config.num_attention_heads
        for layer in {0, worker.info.vision_feature_layer}:
            if layer < len(tower.encoder.layers):
                tower.encoder.layers[layer].self_attn.attn.register_forward_pre_hook(_cls_hook(layer, heads))


def _hidden_hook(worker: Worker, layer: int):
    def hook(module, args, kwargs):
        step = worker.step
        if step is None or layer not in step.hidden:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
        residual = kwargs["residual"] if "residual" in kwargs else (args[2] if len(args) > 2 else None)
        # vLLM carries the residual stream as hidden + residual (the add is fused into the next norm)
        worker.observe_hidden(layer, hidden if residual is None else hidden + residual)

    return hook


def _cls_hook(layer: int, total_heads: int):
    def hook(module, args):
        if not CAPTURE.active:
            return
        query, key = args[0], args[1]
        images, tokens = query.shape[:2]
        q = query.reshape(images, tokens, module.num_heads, module.head_size)[:, 0].float()
        k = key.reshape(images, tokens, module.num_kv_heads, module.head_size).float()
        k = k.repeat_interleave(module.num_heads // module.num_kv_heads, dim=2)
        rows = torch.softmax(
            module.scale * torch.einsum("ihd,ithd->iht", q, k), dim=-1
        )  # [images, heads, tokens]
        if module.num_heads < total_heads:  # heads split over tensor-parallel ranks
            from vllm.distributed import get_tp_group

            rows = get_tp_group().all_gather(rows.contiguous(), 1)
        CAPTURE.add(layer, rows)

    return hook


# -- the runner ------------------------------------------------------------------------------------
def install_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    init = GPUModelRunner.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        attention.WORKER = lambda: make_worker(self)  # made at the first step, once the model is loaded

    removed = GPUModelRunner._on_request_state_removed

    def _on_request_state_removed(self, req_id, req_state):
        removed(self, req_id, req_state)
        worker = attention.WORKER
        if isinstance(worker, Worker):
            worker.finish(req_id)

    dummy_run = GPUModelRunner._dummy_run

    def _dummy_run(self, *args, **kwargs):
        worker = attention.WORKER
        if isinstance(worker, Worker):
            worker.step = None
        return dummy_run(self, *args, **kwargs)

    execute_encoder = GPUModelRunner._execute_mm_encoder

    def _execute_mm_encoder(self, *args, **kwargs):
        CAPTURE.start()
        try:
            return execute_encoder(self, *args, **kwargs)
        finally:
            CAPTURE.active = False

    cache_output = GPUModelRunner._cache_encoder_output

    def _cache_encoder_output(self, mm_hash, *args, **kwargs):
        cache_output(self, mm_hash, *args, **kwargs)
        worker = attention.WORKER
        rows = CAPTURE.next() if CAPTURE.active else None
        if rows is not None and isinstance(worker, Worker):
            worker.keep_vision_rows(mm_hash, rows)

    GPUModelRunner.__init__ = __init__
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._dummy_run = _dummy_run
    GPUModelRunner._execute_mm_encoder = _execute_mm_encoder
    GPUModelRunner._cache_encoder_output = _cache_encoder_output
