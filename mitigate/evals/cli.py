"""The evaluation commands: ``mitigate eval pope|chair``, ``mitigate score pope|chair``, ``mitigate report``.

``register(app)`` adds them to the main ``mitigate`` app. Several processes: ``accelerate launch
--num_processes N -m mitigate.cli eval ...`` (on a machine without GPUs add ``--multi_gpu``, which is
what makes accelerate start N processes; they then share the work on the CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..cli_errors import clean_errors, new_app

console = Console()

eval_app = new_app(no_args_is_help=True, help="Run a benchmark on a model, with or without a method.")
score_app = new_app(no_args_is_help=True, help="Score answers or captions produced anywhere.")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="builtin:tiny-llava, builtin:toy-llava, a folder or a HF id")
]
MethodOpt = Annotated[str, typer.Option(help="none/vanilla, a method or preset (var), or several (var,vhr)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a method parameter: key=value, or method.key=value (var,vhr)"),
]
KernelOpt = Annotated[str, typer.Option(help="auto, reference, torch, ... (not part of the cache key)")]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="builtin:sample (tiny COCO) or builtin:shapes (toy world)")
]
RootOpt = Annotated[Path | None, typer.Option("--coco-root", help="folder with annotations/ and val2014/")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="evaluate only the first N samples")]
BatchOpt = Annotated[int, typer.Option(min=1, help="samples per generate() call")]
TokensOpt = Annotated[int | None, typer.Option(min=1, help="generation length (POPE 16, CHAIR 512)")]
OutOpt = Annotated[Path | None, typer.Option(help="run folder (default runs/<task>-<model>-<method>)")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto")]
DeviceOpt = Annotated[str | None, typer.Option("--device-map", help="e.g. cuda, cpu, auto")]
AttnOpt = Annotated[str | None, typer.Option("--attn-implementation", help="sdpa, eager, flash_attention_2")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bar with rate and ETA")]
SeedOpt = Annotated[int, typer.Option(help="seed of the image draw (and POPE's random negatives)")]
SynonymsOpt = Annotated[
    Path | None, typer.Option(help="CHAIR's synonyms.txt (paper-comparable); default: the built-in table")
]


# Known input problems end a command with one clear line instead of a traceback (mitigate.cli_errors); the
# ``mitigate`` app runs every command under it, this keeps the commands clean in an app of their own too.
_clean_errors = clean_errors


def _splits(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


#: the parameters of an ``eval`` command that make its run configuration (``set_`` is parsed into ``sets``)
RUN_OPTIONS = (
    "model",
    "method",
    "set_",
    "kernel",
    "dtype",
    "device_map",
    "attn_implementation",
    "batch_size",
    "max_new_tokens",
    "out",
    "progress",
)


def _run_config(params: dict[str, Any]):
    """The ``RunConfig`` of an ``eval`` command from its parameters (its ``locals()``): the RUN_OPTIONS, by
    name, so every command passes them the same way."""
    from ..method_options import parse_sets
    from .evaluate import RunConfig

    kw = {name: params[name] for name in RUN_OPTIONS}
    kw["sets"] = parse_sets(kw.pop("set_"))
    return RunConfig(**kw)


def _nothing_scored(results: dict[str, Any]) -> Exception:
    """Why a run has no metrics, from its real counts: every sample failed to generate (errors.jsonl), or
    answers came back but none could be rated (Tri-HE: every extraction or judge call failed, or no answer
    made a claim; the records in samples.jsonl say why)."""
    from ..errors import NothingScoredError

    scored, failed = results.get("n_scored", 0), results.get("n_errors", 0)
    folder = results.get("out")
    if not scored:
        first = (results.get("errors") or [{}])[0].get("error", "")
        return NothingScoredError(
            f"no sample could be scored: all {failed} failed"
            + (f" (the first: {first})" if first else "")
            + (f"; see {folder}/errors.jsonl" if folder else "")
        )
    info = results.get("task_info") or {}
    counts = info.get("counts") or {}
    total = f" of {results['n_samples']}" if "n_samples" in results else ""
    text = f"no sample could be scored: {scored}{total} answered, none could be rated"
    if failed:
        text += f" ({failed} failed to generate)"
    if counts:
        text += (
            f": {counts.get('questions_extraction_error', 0)} with an extraction error, "
            f"{counts.get('questions_all_claims_judge_error', 0)} whose claims all failed to be judged, "
            f"{counts.get('questions_without_claims', 0)} without claims"
        )
    if info.get("first_error"):
        text += f"; the first error: {info['first_error']}"
    if folder:
        text += f"; see {folder}/samples.jsonl"
    return NothingScoredError(text)


def _print_results(results: dict[str, Any]) -> None:
    from .results import metric_rows

    if not results.get("metrics"):
        raise _nothing_scored(results)
    headers, rows = metric_rows(results["task"], results["metrics"])
    title = results["task"].upper()
    if "method" in results:
        title += f": {results['model']['model']}, {results['method']['label']}"
    table = Table(title=title + " (rates in %)")
    for h in headers:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if results.get("n_errors"):
        console.print(f"[yellow]{results['n_errors']} sample(s) failed[/yellow]; see errors.jsonl")
    if "out" in results:
        console.print(f"Results in {results['out']}/ (results.json, results.md, samples.jsonl)")


@eval_app.command("pope")
def eval_pope(
    model: ModelOpt,
    method: MethodOpt = "vanilla",
    set_: SetOpt = None,
    kernel: KernelOpt = "auto",
    data: DataOpt = None,
    coco_root: RootOpt = None,
    split: Annotated[
        list[str] | None, typer.Option(help="random, popular, adversarial (default all)")
    ] = None,
    questions: Annotated[
        list[Path] | None, typer.Option(help="official question files (coco_pope_<split>.json) to use")
    ] = None,
    parser: Annotated[str, typer.Option(help="answer parser: pope, opera, vcd or strict")] = "pope",
    images: Annotated[int, typer.Option(min=1, help="images to draw when building questions")] = 500,
    seed: SeedOpt = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N questions of each split")] = None,
    batch_size: BatchOpt = 8,
    max_new_tokens: TokensOpt = None,
    out: OutOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceOpt = None,
    attn_implementation: AttnOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """POPE: yes/no questions about COCO objects (random, popular, adversarial splits)."""
    from .coco import open_data
    from .evaluate import evaluate
    from .tasks import PopeTask

    with _clean_errors():
        source = open_data(data, coco_root)
        task = PopeTask(
            source,
            splits=_splits(split),
            questions=list(questions or []),
            n_images=images,
            seed=seed,
            parser=parser,
            limit=limit,
        )
        results = evaluate(task, _run_config(locals()))
        if results is not None:
            _print_results(results)


@eval_app.command("chair")
def eval_chair(
    model: ModelOpt,
    method: MethodOpt = "vanilla",
    set_: SetOpt = None,
    kernel: KernelOpt = "auto",
    data: DataOpt = None,
    coco_root: RootOpt = None,
    synonyms: SynonymsOpt = None,
    image_ids: Annotated[
        Path | None, typer.Option(help="the images to caption: ids as text, a JSON list or JSON lines")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="images in the seeded draw over val2014")] = 500,
    seed: SeedOpt = 0,
    prompt: Annotated[
        str, typer.Option(help="the captioning prompt")
    ] = "Please describe this image in detail.",
    limit: LimitOpt = None,
    batch_size: BatchOpt = 8,
    max_new_tokens: TokensOpt = None,
    out: OutOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceOpt = None,
    attn_implementation: AttnOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """CHAIR: caption COCO images and count the objects mentioned that are not there."""
    from .coco import open_data
    from .evaluate import evaluate
    from .tasks import ChairTask

    with _clean_errors():
        source = open_data(data, coco_root)
        task = ChairTask(
            source,
            synonyms=synonyms,
            image_ids=image_ids,
            n_images=images,
            seed=seed,
            limit=limit,
            prompt=prompt,
        )
        results = evaluate(task, _run_config(locals()))
        if results is not None:
            _print_results(results)


def _default_metrics_path(source: Path, task: str) -> Path:
    return source.with_name(f"{source.stem}.{task}_metrics.json")


@score_app.command("pope")
def score_pope_cmd(
    questions: Annotated[list[Path], typer.Option(help="official question file(s), one per split")],
    answers: Annotated[
        list[Path], typer.Option(help="JSON lines: question_id, text (and split, with several files)")
    ],
    parser: Annotated[str, typer.Option(help="pope, opera, vcd or strict")] = "pope",
    out: Annotated[
        Path | None, typer.Option(help="metrics JSON (default <answers>.pope_metrics.json)")
    ] = None,
) -> None:
    """Score POPE answers: accuracy, precision, recall, F1 and yes-ratio per split, and the mean F1."""
    from .jsonl import write_json
    from .score import score_pope

    with _clean_errors():
        result, _ = score_pope(questions, answers, parser)
        path = out or _default_metrics_path(answers[0], "pope")
        write_json(path, result)
        _print_results(result)
    console.print(f"Metrics written to {path}")


@score_app.command("chair")
def score_chair_cmd(
    captions: Annotated[Path, typer.Option(help="JSON lines (or a JSON list): image_id, caption")],
    coco_root: RootOpt = None,
    data: DataOpt = None,
    synonyms: SynonymsOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="metrics JSON (default <captions>.chair_metrics.json)")
    ] = None,
) -> None:
    """Score captions with CHAIR: CHAIR_s, CHAIR_i, recall and length."""
    from .coco import open_data
    from .jsonl import write_json
    from .score import score_chair

    with _clean_errors():
        result, _ = score_chair(captions, open_data(data, coco_root), synonyms)
        path = out or _default_metrics_path(captions, "chair")
        write_json(path, result)
        _print_results(result)
    console.print(f"Metrics written to {path}")


def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders (from mitigate eval) of one task")],
    baseline: Annotated[
        Path | None, typer.Option(help="the run to compare against (default: vanilla)")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for report.json, report.md and report.png")] = Path(
        "report"
    ),
    resamples: Annotated[int, typer.Option(min=10, help="bootstrap resamples")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999)] = 0.95,
) -> None:
    """Compare methods against vanilla: paired bootstrap intervals, a Markdown table and a plot."""
    from .report import compare_runs, report_markdown, write_report

    with _clean_errors():
        result = compare_runs(runs, baseline=baseline, resamples=resamples, seed=seed, confidence=confidence)
        paths = write_report(result, out)
    typer.echo(report_markdown(result))
    console.print(f"Written: {', '.join(str(p) for p in paths.values())}")


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``score``, ``report`` and ``compare`` to the main ``mitigate`` app."""
    from . import trihe_cli  # noqa: F401  (adds eval trihe and score trihe to the groups)
    from .compare_cli import compare

    app.add_typer(eval_app, name="eval")
    app.add_typer(score_app, name="score")
    app.command("report")(report)
    app.command("compare")(compare)


def standalone() -> typer.Typer:
    """The eval commands on their own (``python -m mitigate.evals``)."""
    app = new_app(add_completion=False, no_args_is_help=True, help="mitigate's evaluation suite.")
    register(app)
    return app
