"""``mitigate eval trihe`` and ``mitigate score trihe`` (added to the eval and score groups on import), and
the ``--judge*`` options that ``mitigate compare`` shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .cli import (
    AttnOpt,
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    KernelOpt,
    MethodOpt,
    ModelOpt,
    OutOpt,
    ProgressOpt,
    SetOpt,
    TokensOpt,
    _clean_errors,
    _print_results,
    _run_config,
    console,
    eval_app,
    score_app,
)
from .judge import DEFAULT_URL, JudgeConfig

TriheDataOpt = Annotated[Path, typer.Option("--data", help="the released tri-he.json")]
ImageRootOpt = Annotated[
    Path, typer.Option("--image-root", help="the Tri-HE images: <image id>.jpg (data/usage_figures)")
]
JudgeOpt = Annotated[
    str,
    typer.Option(
        "--judge",
        help="llm: the chat model judges (the paper's protocol); local:<folder or hub id>: an NLI "
        "cross-encoder judges (a deviation from the paper; extraction still uses the chat model)",
    ),
]
JudgeUrlOpt = Annotated[
    str, typer.Option("--judge-url", help="base URL of an OpenAI-compatible chat endpoint (vLLM, Ollama...)")
]
JudgeModelOpt = Annotated[
    str | None,
    typer.Option("--judge-model", help="the chat model (the paper: gpt-4-1106-preview); key from "
                 "MITIGATE_JUDGE_API_KEY or OPENAI_API_KEY"),
]  # fmt: skip
JudgeConcurrencyOpt = Annotated[int, typer.Option("--judge-concurrency", min=1, help="requests at once")]
JudgeTimeoutOpt = Annotated[float, typer.Option("--judge-timeout", min=1.0, help="seconds per request")]
JudgeCacheOpt = Annotated[
    Path | None,
    typer.Option("--judge-cache", help="JSON-lines reply cache (default: in the run folder or beside --out)"),
]
TriheLimitOpt = Annotated[int | None, typer.Option(min=1, help="the first N images, all their questions")]


def judge_config(params: dict[str, Any], cache: Path | None) -> JudgeConfig:
    """The judge of a command from its ``--judge*`` parameters (its ``locals()``, read by name), its replies
    cached in ``cache``."""
    return JudgeConfig(
        params["judge"],
        params["judge_url"],
        params["judge_model"],
        concurrency=params["judge_concurrency"],
        timeout=params["judge_timeout"],
        cache=cache,
    )


def _print_note(results: dict) -> None:
    note = results.get("task_info", {}).get("note")
    if note:
        console.print(note, markup=False, highlight=False)


@eval_app.command("trihe")
def eval_trihe(
    model: ModelOpt,
    data: TriheDataOpt,
    image_root: ImageRootOpt,
    method: MethodOpt = "vanilla",
    set_: SetOpt = None,
    kernel: KernelOpt = "auto",
    judge: JudgeOpt = "llm",
    judge_url: JudgeUrlOpt = DEFAULT_URL,
    judge_model: JudgeModelOpt = None,
    judge_concurrency: JudgeConcurrencyOpt = 8,
    judge_timeout: JudgeTimeoutOpt = 60.0,
    judge_cache: JudgeCacheOpt = None,
    limit: TriheLimitOpt = None,
    batch_size: BatchOpt = 8,
    max_new_tokens: TokensOpt = None,
    out: OutOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceOpt = None,
    attn_implementation: AttnOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Tri-HE: free-form answers to questions about GQA images, their claims judged triplet by triplet
    (Hallu-I, Hallu-Q; object and relation hallucination)."""
    from .evaluate import default_out, evaluate
    from .trihe import TriheTask

    with _clean_errors():
        cfg = _run_config(locals())
        cfg.out = cfg.out or default_out("trihe", model, method, cfg.sets)
        judging = judge_config(locals(), judge_cache or cfg.out / "judge_cache.jsonl")
        task = TriheTask(data, judge=judging, image_root=image_root, limit=limit, progress=progress)
        results = evaluate(task, cfg)
    if results is not None:
        _print_results(results)
        _print_note(results)


@score_app.command("trihe")
def score_trihe_cmd(
    data: TriheDataOpt,
    answers: Annotated[Path, typer.Option(help="JSON lines: image_id, question, text")],
    judge: JudgeOpt = "llm",
    judge_url: JudgeUrlOpt = DEFAULT_URL,
    judge_model: JudgeModelOpt = None,
    judge_concurrency: JudgeConcurrencyOpt = 8,
    judge_timeout: JudgeTimeoutOpt = 60.0,
    judge_cache: JudgeCacheOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(help="metrics JSON (default <answers>.trihe_metrics.json); per-question log beside it"),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Score Tri-HE answers made elsewhere: Hallu-I, Hallu-Q, and their object and relation parts."""
    from .jsonl import write_json, write_jsonl
    from .trihe import score_trihe

    path = out or answers.with_name(f"{answers.stem}.trihe_metrics.json")
    with _clean_errors():
        judging = judge_config(locals(), judge_cache or path.with_name(f"{path.stem}.judge_cache.jsonl"))
        result, records = score_trihe(data, answers, judging, progress=progress)
    write_json(path, result)
    samples = path.with_name(f"{path.stem}.samples.jsonl")
    write_jsonl(samples, records)
    _print_results(result)
    _print_note(result)
    console.print(f"Metrics written to {path}; per-question claims and verdicts in {samples}")
