"""``mitigate compare``: vanilla and each method's defaults (or the listed presets) on one model, POPE,
CHAIR and Tri-HE under one protocol, one table with paired intervals against vanilla, and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli import (
    AttnOpt,
    BatchOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    KernelOpt,
    ModelOpt,
    ProgressOpt,
    RootOpt,
    SynonymsOpt,
    _clean_errors,
    console,
)
from .judge import DEFAULT_URL
from .trihe_cli import (
    JudgeCacheOpt,
    JudgeConcurrencyOpt,
    JudgeModelOpt,
    JudgeOpt,
    JudgeTimeoutOpt,
    JudgeUrlOpt,
    judge_config,
)

BENCHMARKS = ("pope", "chair", "trihe")


def compare(
    model: ModelOpt,
    methods: Annotated[
        str, typer.Option(help="all (each method at its defaults), or methods/presets: var,pai,var+vhr")
    ] = "all",
    benchmarks: Annotated[str, typer.Option(help="any of pope,chair,trihe")] = "pope,chair",
    data: DataOpt = None,
    coco_root: RootOpt = None,
    synonyms: SynonymsOpt = None,
    trihe_data: Annotated[Path | None, typer.Option(help="Tri-HE: the released tri-he.json")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Tri-HE: folder of <image id>.jpg")] = None,
    judge: JudgeOpt = "llm",
    judge_url: JudgeUrlOpt = DEFAULT_URL,
    judge_model: JudgeModelOpt = None,
    judge_concurrency: JudgeConcurrencyOpt = 8,
    judge_timeout: JudgeTimeoutOpt = 60.0,
    judge_cache: JudgeCacheOpt = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="POPE: questions per split; CHAIR and Tri-HE: images")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="CHAIR and Tri-HE answer length (default 512; POPE keeps 16)")
    ] = None,
    batch_size: BatchOpt = 8,
    runs: Annotated[
        Path | None, typer.Option(help="run folders, reused as a cache (default runs/compare-<model>)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="compare.json/.md/.png (default: the runs folder)")] = None,
    resamples: Annotated[int, typer.Option(min=10, help="bootstrap resamples")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999)] = 0.95,
    kernel: KernelOpt = "auto",
    dtype: DtypeOpt = None,
    device_map: DeviceOpt = None,
    attn_implementation: AttnOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Every method against vanilla on one model, under one protocol: one table, paired intervals, a plot."""
    from .. import list_methods
    from .coco import open_data
    from .compare import Benchmark, parse_settings, run_compare, write_compare
    from .evaluate import slug
    from .tasks import ChairTask, PopeTask
    from .trihe import TriheTask

    with _clean_errors():
        names = [b.strip().lower() for b in benchmarks.split(",") if b.strip()]
        unknown = [b for b in names if b not in BENCHMARKS]
        if unknown or not names:
            raise ValueError(f"--benchmarks {benchmarks!r}: choose from {', '.join(BENCHMARKS)}")
        settings = parse_settings(methods, list_methods())
        runs = runs or Path("runs") / f"compare-{slug(model)}"
        chosen, coco = [], None
        if {"pope", "chair"} & set(names):
            coco = open_data(data, coco_root)
        for name in dict.fromkeys(names):
            if name == "pope":
                chosen.append(Benchmark("pope", PopeTask(coco, limit=limit)))
            elif name == "chair":
                task = ChairTask(coco, synonyms=synonyms, limit=limit)
                chosen.append(Benchmark("chair", task, max_new_tokens=max_new_tokens))
            else:
                if trihe_data is None or image_root is None:
                    raise ValueError("--benchmarks trihe needs --trihe-data tri-he.json and --image-root DIR")
                # one cache for every setting's answers
                judging = judge_config(locals(), judge_cache or runs / "judge_cache.jsonl")
                task = TriheTask(
                    trihe_data, judge=judging, image_root=image_root, limit=limit, progress=progress
                )
                chosen.append(Benchmark("trihe", task, max_new_tokens=max_new_tokens))
        options = {
            "kernel": kernel,
            "dtype": dtype,
            "device_map": device_map,
            "attn_implementation": attn_implementation,
            "batch_size": batch_size,
            "progress": progress,
        }
        console.print(f"{len(settings)} settings x {len(chosen)} benchmarks into {runs}/")
        report = run_compare(
            model,
            settings,
            chosen,
            runs,
            run_options=options,
            resamples=resamples,
            seed=seed,
            confidence=confidence,
            echo=lambda line: console.print(line, markup=False, highlight=False),
        )
    if report is None:  # a non-main process of a sharded launch
        return
    report["limit"] = limit
    paths = write_compare(report, out or runs)
    typer.echo(paths["markdown"].read_text())
    console.print(f"Written: {', '.join(str(p) for p in paths.values())}")
