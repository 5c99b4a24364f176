"""The lmms-eval model ``mitigate``: any model mitigate loads, mitigated, answering ``generate_until``.

    lmms-eval --model mitigate --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=var --tasks pope

``model_args``: ``pretrained`` (a Hub id, a folder or ``builtin:<name>``), ``method`` (a method or preset;
``var+vhr`` composes; ``none`` runs the model unmitigated), ``dtype``, ``device_map``, ``kernel``; every
other key is a parameter of the method (``tau=10``, ``sink_dims=[2533,1415]``; values are read as YAML).
``--batch_size`` batches requests that share generation settings, left-padded.

Each prompt is the task's text in the model's own chat template, with the document's images before it
(as LLaVA was trained); an ``<image>`` placeholder in a task's text is dropped for that reason. Greedy
unless the task asks for a temperature above zero. Video and audio documents and ``loglikelihood``
(likelihood-ranked multiple choice) are refused with an error that says so.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch
import yaml
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ...api import apply_mitigation
from ...loading import load_model, model_device


class MitigatedLMM(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "var",
        dtype: str | None = None,
        device_map: str | None = None,
        kernel: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        from accelerate import PartialState

        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        if device_map is None:  # one model per process under accelerate launch; else what lmms-eval says
            device_map = str(state.device) if state.num_processes > 1 else device
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError as exc:
            raise ValueError(f"mitigate: batch_size must be a number, not {batch_size!r}") from exc
        self.model, self.processor = load_model(str(pretrained), dtype=dtype, device_map=device_map)
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._tokenizer.padding_side = "left"
        self.chat_template = None
        spec = _method_spec(str(method))
        self.method = "none" if spec is None else str(method)
        overrides = {k: _value(v) for k, v in params.items()}
        if spec is None and overrides:
            raise ValueError(f"mitigate: parameters {sorted(overrides)} given with method=none")
        self.mitigation = None
        if spec is not None:
            self.mitigation = apply_mitigation(
                self.model, spec, kernel=kernel, processor=self.processor, **overrides
            )

    # -- what lmms-eval reads ----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eot_token_id(self) -> int | None:
        return self._tokenizer.eos_token_id

    # -- requests ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the mitigate model answers generation tasks only (generate_until); loglikelihood, used by "
            "likelihood-ranked multiple-choice tasks, is not supported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the mitigate model does not support multi-round generation tasks")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in the order of ``requests``; requests with equal generation settings share batches,
        longest prompt first."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mitigate: generating")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self._generate([requests[i] for i in chunk])
                for i, text in zip(chunk, texts, strict=True):
                    answers[i] = text
                bar.update(len(chunk))
        bar.close()
        return [a if a is not None else "" for a in answers]

    @torch.inference_mode()
    def _generate(self, chunk: list[Instance]) -> list[str]:
        gen_kwargs = dict(chunk[0].args[1] or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        prompts, images = [], []
        for request in chunk:
            context, _, doc_to_visual, doc_id, task, split = request.args[:6]
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompts.append(self._prompt(context, len(visuals)))
            images.append(visuals)
        inputs = self.processor(
            images=images if any(images) else None, text=prompts, return_tensors="pt", padding=True
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        settings: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 1024))}
        beams = int(gen_kwargs.get("num_beams", 1) or 1)
        if beams > 1 and self.mitigation is not None:
            raise NotImplementedError(
                "mitigate: beam search with a mitigation is not supported; use num_beams=1"
            )
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        if temperature > 0:
            settings.update(do_sample=True, temperature=temperature, top_p=gen_kwargs.get("top_p"))
        else:
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        settings["num_beams"] = beams
        if until:  # HF's stop_strings needs a tokenizer vocabulary it can parse; this works with any
            start = inputs["input_ids"].shape[1]
            settings["stopping_criteria"] = StoppingCriteriaList([_Until(self._tokenizer, until, start)])
        out = self.model.generate(**inputs, **settings)
        texts = self._tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not isinstance(visuals, list | tuple):
            visuals = [visuals]
        out = []
        for visual in visuals:
            if visual is None:
                continue
            if not isinstance(visual, Image.Image):
                raise NotImplementedError(
                    f"mitigate: task {task!r} gives a {type(visual).__name__} visual; only images are "
                    "supported"
                )
            out.append(visual.convert("RGB"))
        return out

    def _prompt(self, context: str, n_images: int) -> str:
        image_token = getattr(self.processor, "image_token", None)
        if image_token:
            context = context.replace(image_token, "").strip()
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )


class _Until(StoppingCriteria):
    """Stops each row once its generated text holds one of the task's stop strings."""

    def __init__(self, tokenizer: Any, until: list[str], start: int):
        self.tokenizer, self.until, self.start = tokenizer, until, start

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [any(s and s in text for s in self.until) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop string."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _method_spec(method: str) -> str | list[str] | None:
    names = [m.strip() for m in method.split("+") if m.strip()]
    if not names or (len(names) == 1 and names[0].lower() in ("none", "vanilla")):
        return None
    return names[0] if len(names) == 1 else names


def _value(value: Any) -> Any:
    """lmms-eval parses numbers and booleans; lists and the rest arrive as text, read here as YAML."""
    return yaml.safe_load(value) if isinstance(value, str) else value


__all__ = ["MitigatedLMM"]
