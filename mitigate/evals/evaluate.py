"""One evaluation run: a task, a model and a method, into a run folder (resumable, shardable)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ConfigError
from ..method_options import VANILLA, is_vanilla, method_request
from .cache import ERRORS, PredictionCache
from .jsonl import scan_lines, write_jsonl
from .parallel import Shard, barrier, current_shard, init_group, local_device
from .results import write_run
from .runfolder import RunLock, claim
from .runner import GenerationConfig, generate_all, run_key, sample_keys
from .tasks import Task, scoring_of

__all__ = ["VANILLA", "RunConfig", "evaluate", "method_label"]


@dataclass
class RunConfig:
    model: str
    method: str = "vanilla"
    sets: dict[str, Any] = field(default_factory=dict)
    kernel: str = "auto"
    dtype: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    out: Path | None = None
    progress: bool = True


def method_label(method: str, sets: dict[str, Any]) -> str:
    if is_vanilla(method):
        return "vanilla"
    extra = ", ".join(f"{k}={v}" for k, v in sets.items())
    return f"{method} ({extra})" if extra else method


def slug(text: str) -> str:
    text = text.removeprefix("builtin:").rstrip("/").split("/")[-1] if "/" in text or ":" in text else text
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-") or "run"


def default_out(task: str, model: str, method: str, sets: dict[str, Any]) -> Path:
    name = f"{task}-{slug(model)}-{slug(method.replace(',', '+'))}"
    if sets:
        name += "-" + slug("-".join(f"{k}={v}" for k, v in sets.items()))
    return Path("runs") / name


def _errors_file(out: Path, shard: Shard) -> Path:
    # never errors.jsonl itself: that file also keeps the cache lines quarantined as corrupt
    return out / f"errors.rank{shard.rank}.jsonl"


def evaluate(task: Task, cfg: RunConfig) -> dict[str, Any] | None:
    """Run (or resume) ``task``; returns the results on the main process, ``None`` on the others.

    Everything that can be checked is checked before anything is generated: the method and its
    parameters (names and values before the model is loaded, what depends on the model right after), the
    data, and the run folder (locked for this run, and refused if it holds a different run)."""
    from ..loading import load_model

    shard = current_shard()
    init_group(shard)
    out = Path(cfg.out or default_out(task.name, cfg.model, cfg.method, cfg.sets))
    vanilla = is_vanilla(cfg.method)
    if vanilla and cfg.sets:
        raise ConfigError("--set needs a method; vanilla has no parameters")
    request = None if vanilla else method_request(cfg.method, cfg.sets)

    docs = task.docs()
    task.check()
    samples = [task.sample(d) for d in docs]

    lock = RunLock(out) if shard.main else None  # the other processes write only their own files
    if lock is not None:
        lock.acquire()
    handle = None
    try:
        # Default: this process's GPU when sharded, the GPU when there is one, else the CPU.
        device_map = cfg.device_map or local_device(shard) or ("cuda" if torch.cuda.is_available() else None)
        model, processor = load_model(
            cfg.model, dtype=cfg.dtype, device_map=device_map, attn_implementation=cfg.attn_implementation
        )
        if request is not None:
            from ..api import apply_mitigation

            handle = apply_mitigation(
                model, request.spec, kernel=cfg.kernel, processor=processor, **request.overrides
            )
        methods = handle.methods if handle else {}
        generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens or task.default_max_new_tokens)
        model_info = {"model": cfg.model, "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation}
        key = run_key(model_info, methods, generation)
        if shard.main:
            claim(
                out,
                task=task.name,
                run_key=key,
                label=method_label(cfg.method, cfg.sets),
                settings={
                    "model": model_info,
                    "methods": methods,
                    "generation": generation.as_dict(),
                    # another parser, synonym table or judge would rewrite the results with other numbers
                    "scoring": scoring_of(task.info()),
                },
            )
        barrier(shard)  # the other processes generate once the folder is this run's
        cache = PredictionCache(out, shard)
        started = time.time()
        errors = generate_all(
            model,
            processor,
            samples,
            generation,
            cache,
            key=key,
            batch_size=cfg.batch_size,
            shard=shard,
            progress=cfg.progress,
            desc=f"{task.name} {method_label(cfg.method, cfg.sets)}",
            before=task.before_generating,
        )
        write_jsonl(_errors_file(out, shard), errors)
        barrier(shard)
        if not shard.main:
            return None
        cache.merge()
        answers = {r["key"]: r["text"] for r in cache.load().values() if r.get("run") == key}
        messages = _gather_errors(out)
        keys = sample_keys(processor, samples, key)
        answered, failed = [], []
        for doc, sample in zip(docs, samples, strict=True):
            text = answers.get(keys[sample.id])
            if text is None:
                failed.append({"sample_id": sample.id, "error": messages.get(sample.id, "no answer")})
            else:
                answered.append((doc, text))
        records = task.process_all(answered)
        quarantined = _quarantined(out)
        write_jsonl(out / ERRORS, quarantined + failed)
        results = {
            "task": task.name,
            "mitigate_version": __version__,
            "model": model_info | {"device_map": device_map},
            "method": {
                "spec": cfg.method,
                "label": method_label(cfg.method, cfg.sets),
                "sets": cfg.sets,
                "resolved": methods,
                "presets": handle.presets if handle else {},
                "kernel": handle.kernel if handle else None,
            },
            "generation": generation.as_dict(),
            "batch_size": cfg.batch_size,
            "processes": shard.world,
            "run_key": key,
            "task_info": task.info(),
            "n_samples": len(docs),
            "n_scored": len(records),
            "n_errors": len(failed),
            "errors": failed[:20],
            "metrics": task.aggregate(records) if records else {},
            "seconds_this_call": round(time.time() - started, 2),
        }
        write_run(out, results, records)
        results["out"] = str(out)
        return results
    finally:
        if handle is not None:
            handle.remove()
        if lock is not None:
            lock.release()


def _quarantined(out: Path) -> list[dict[str, Any]]:
    """The corrupt cache lines ``errors.jsonl`` keeps (see :mod:`.cache`)."""
    path = out / ERRORS
    if not path.is_file():
        return []
    return [r for _, r in scan_lines(path, skip_partial_tail=True)[0] if "quarantined" in r]


def _gather_errors(out: Path) -> dict[str, str]:
    """Per-sample error messages written by every process of this run."""
    messages: dict[str, str] = {}
    for path in sorted(out.glob("errors.rank*.jsonl")):
        for _, record in scan_lines(path, skip_partial_tail=True)[0]:
            if "sample_id" in record:
                messages[record["sample_id"]] = str(record.get("error"))
        path.unlink()
    path = out / ERRORS
    if path.is_file():
        for _, record in scan_lines(path, skip_partial_tail=True)[0]:
            if "sample_id" in record:
                messages.setdefault(record["sample_id"], str(record.get("error")))
    return messages
