"""``mitigate compare``: vanilla and every method on one model, under one protocol, in one table.

Each (setting, benchmark) is an ordinary run of :func:`.evaluate.evaluate` into
``<runs>/<benchmark>-<setting>``, so the runner's cache makes a rerun (or a run extended with more
methods) generate only what is missing. The table is read back from those run folders: per setting and
headline metric, the value with its bootstrap interval, and the change against vanilla with its paired
bootstrap interval over the samples both runs scored (:func:`.bootstrap.paired_bootstrap`, the same as
``mitigate report``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bootstrap import paired_bootstrap
from .evaluate import VANILLA, RunConfig, evaluate
from .jsonl import write_json
from .results import load_run
from .tasks import Task


@dataclass(frozen=True)
class Column:
    key: str  # "<group>.<flattened metric>", e.g. "pope.mean_f1", "chair.chair_i"
    header: str
    lower_is_better: bool = False
    percent: bool = True


HEADLINE: dict[str, list[Column]] = {
    "pope": [
        Column("pope.mean_f1", "POPE mean F1"),
        Column("pope.random.accuracy", "POPE acc random"),
        Column("pope.adversarial.accuracy", "POPE acc adversarial"),
        Column("pope.adversarial.yes_ratio", "POPE yes-ratio adversarial"),
    ],
    "chair": [
        Column("chair.chair_i", "CHAIR_i", lower_is_better=True),
        Column("chair.chair_s", "CHAIR_s", lower_is_better=True),
        Column("chair.recall", "CHAIR recall"),
    ],
    "trihe": [
        Column("trihe.hallu_i", "Hallu-I", lower_is_better=True),
        Column("trihe.hallu_q", "Hallu-Q", lower_is_better=True),
        Column("trihe.object_hallu_i", "object Hallu-I", lower_is_better=True),
        Column("trihe.relation_hallu_i", "relation Hallu-I", lower_is_better=True),
    ],
}


@dataclass(frozen=True)
class Setting:
    label: str
    method: str = "vanilla"  # a method, a preset, or several composed ("var,vhr")
    sets: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str  # the metric group: "pope", "chair", "trihe"
    task: Task
    max_new_tokens: int | None = None
    # More metric groups computed from this benchmark's records (e.g. the toy world's false-yes rates):
    # name -> an object with the Task's static ``stats`` and ``metrics``.
    extra: dict[str, Any] = field(default_factory=dict)


def parse_settings(spec: str, available: list[str]) -> list[Setting]:
    """``all`` (every method at its defaults), or a comma-separated list of methods or presets; ``a+b``
    composes methods into one setting. Vanilla always comes first."""
    names = available if spec.strip().lower() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    out = [Setting("vanilla")]
    for name in names:
        if name.lower() in VANILLA:
            continue
        method = ",".join(p.strip() for p in name.split("+") if p.strip())
        if method and all(s.label != name for s in out):
            out.append(Setting(name, method))
    if len(out) == 1:
        raise ValueError(f"--methods {spec!r} names no method; e.g. all, or {', '.join(available[:3])}")
    return out


def run_folder(runs: Path, benchmark: str, label: str) -> Path:
    return Path(runs) / f"{benchmark}-{re.sub(r'[^A-Za-z0-9._=-]+', '-', label).strip('-')}"


def run_compare(
    model: str,
    settings: list[Setting],
    benchmarks: list[Benchmark],
    runs: Path,
    *,
    run_options: dict[str, Any] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    columns: list[Column] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Run what the cache lacks, then compare; ``None`` on the non-main processes of a sharded launch.

    Every setting's method names and parameters, and every benchmark's data (and Tri-HE's judge), are
    checked before anything is generated (a typo fails the command, with a suggestion). A setting the
    model's family refuses (``UnsupportedModelError``, with the reason) is skipped and listed, so
    ``--methods all`` works on every family; any other error stops the comparison."""
    from ..errors import UnsupportedModelError
    from ..method_options import method_request

    if not settings or settings[0].method.strip().lower() not in VANILLA:
        raise ValueError("the first setting must be vanilla: every comparison is against it")
    for setting in settings[1:]:
        method_request(setting.method, dict(setting.sets))  # names and values, before any generation
    for bench in benchmarks:  # every benchmark's data (and Tri-HE's judge) before the first one runs
        bench.task.check()
        bench.task.before_generating(1)  # a comparison generates: its judge must answer
    folders: dict[str, dict[str, Path]] = {}
    skipped: dict[str, str] = {}
    main = True
    for setting in settings:
        for bench in benchmarks:
            out = run_folder(runs, bench.name, setting.label)
            cfg = RunConfig(
                model=model,
                method=setting.method,
                sets=dict(setting.sets),
                max_new_tokens=bench.max_new_tokens,
                out=out,
                **(run_options or {}),
            )
            try:
                results = evaluate(bench.task, cfg)
            except UnsupportedModelError as error:
                if setting.label == "vanilla":
                    raise
                skipped[setting.label] = str(error)
                folders.pop(setting.label, None)
                echo(f"  {setting.label}: skipped ({error})")
                break
            main = results is not None
            folders.setdefault(setting.label, {})[bench.name] = out
            if main:
                echo(f"  {bench.name:5s} {setting.label}: {results['n_scored']} scored -> {out}")
    if not main:
        return None
    report = summarize(model, settings, benchmarks, folders, resamples, seed, confidence, columns)
    report["skipped"] = skipped
    return report


def summarize(
    model: str,
    settings: list[Setting],
    benchmarks: list[Benchmark],
    folders: dict[str, dict[str, Path]],
    resamples: int,
    seed: int,
    confidence: float,
    columns: list[Column] | None = None,
) -> dict[str, Any]:
    """The table, from the run folders' own results and per-sample records."""
    base = {b.name: load_run(folders["vanilla"][b.name])[1] for b in benchmarks}
    rows = []
    for setting in settings:
        if setting.label not in folders:
            continue
        metrics: dict[str, dict[str, Any]] = {}
        row: dict[str, Any] = {"label": setting.label, "folders": {}, "n": {}, "n_scored": {}}
        for bench in benchmarks:
            folder = folders[setting.label][bench.name]
            results, records = load_run(folder)
            row["folders"][bench.name] = str(folder)
            # n: the samples behind the figures, those this run shares with vanilla (paired_bootstrap's)
            shared = {r["sample_id"] for r in base[bench.name]}
            row["n"][bench.name] = sum(r["sample_id"] in shared for r in records)
            row["n_scored"][bench.name] = results["n_scored"]
            row.setdefault("method", results["method"]["spec"])
            row.setdefault("sets", results["method"]["sets"])
            row.setdefault("resolved", results["method"]["resolved"])
            row.setdefault("presets", results["method"]["presets"])
            if not records or not results["metrics"] or not base[bench.name]:
                continue  # nothing scored: no values (the Markdown shows the count)
            groups = {bench.name: type(bench.task), **bench.extra}
            for group, task in groups.items():
                comp = paired_bootstrap(
                    task, base[bench.name], records, resamples=resamples, seed=seed, confidence=confidence
                )
                for name, m in comp["metrics"].items():
                    metrics[f"{group}.{name}"] = {
                        "value": m["method"],
                        "ci": m["ci_method"],
                        "delta": m["delta"],
                        "delta_ci": m["ci"],
                    }
        row["metrics"] = metrics
        rows.append(row)
    if columns is None:
        columns = [c for b in benchmarks for c in HEADLINE.get(b.name, [])]
    present = set().union(*(r["metrics"] for r in rows)) if rows else set()
    columns = [c for c in columns if c.key in present]
    return {
        "model": model,
        "benchmarks": [b.name for b in benchmarks],
        "task_info": {b.name: b.task.info() for b in benchmarks},
        "columns": [vars(c) for c in columns],
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------- output


def _columns(report: dict[str, Any]) -> list[Column]:
    return [Column(**c) for c in report["columns"]]


def _num(column: Column, x: float, signed: bool = False) -> str:
    value = 100 * x if column.percent else x
    digits = 1 if column.percent else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def compare_markdown(
    report: dict[str, Any], *, title: str | None = None, note: str | None = None, legend: str = ""
) -> str:
    columns = _columns(report)
    rows = report["rows"]
    head = "| setting | " + " | ".join(c.header for c in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    percent = "Rates in %, with" if any(c.percent for c in columns) else "With"
    pope = " POPE resampled within each split." if "pope" in report["benchmarks"] else ""
    lines = [f"# {title or 'Methods compared on ' + report['model']}", ""]
    if note:
        lines += [note, ""]
    lines += [
        f"{percent} {round(100 * report['confidence'])}% bootstrap intervals ({report['resamples']} "
        f"resamples).{pope} {legend}".rstrip(),
        "",
        "## Values",
        "",
        head,
        rule,
    ]
    for row in rows:
        cells = []
        for c in columns:
            m = row["metrics"].get(c.key)
            cells.append(
                f"{_num(c, m['value'])} [{_num(c, m['ci'][0])}, {_num(c, m['ci'][1])}]" if m else "-"
            )
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lower = [c.header for c in columns if c.lower_is_better]
    lines += [
        "",
        "## Change against vanilla (paired)",
        "",
        "Points; **bold** where the interval excludes 0 (better or worse)."
        + (f" Lower is better for {', '.join(lower)}." if lower else ""),
        "",
        head,
        rule,
    ]
    for row in rows[1:]:
        cells = []
        for c in columns:
            m = row["metrics"].get(c.key)
            if m is None:
                cells.append("-")
                continue
            lo, hi = m["delta_ci"]
            text = f"{_num(c, m['delta'], True)} [{_num(c, lo, True)}, {_num(c, hi, True)}]"
            cells.append(f"**{text}**" if lo > 0 or hi < 0 else text)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Settings", ""]
    lines += ["n: the samples behind a row's figures, those it shares with vanilla.", ""]
    for row in rows:
        n = ", ".join(f"{b} {k}" for b, k in row["n"].items())
        scored = row.get("n_scored", {})
        lost = ", ".join(f"{b} {scored[b]}" for b, k in row["n"].items() if scored.get(b, k) != k)
        lost = f"; scored: {lost}" if lost else ""
        lines.append(f"- {row['label']} (n: {n}{lost}): `{json.dumps(row['resolved'], sort_keys=True)}`")
    if report.get("skipped"):
        lines += ["", "## Not run", ""]
        lines += [f"- {label}: {reason}" for label, reason in report["skipped"].items()]
    notes = [i["note"] for i in report.get("task_info", {}).values() if isinstance(i, dict) and i.get("note")]
    if notes:
        lines += ["", "## Scoring notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_compare(report: dict[str, Any], path: Path, title: str | None = None) -> None:
    """One panel per column: a bar per setting with its interval; vanilla's value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    columns = _columns(report)
    cols = min(4, max(1, len(columns)))
    nrows = -(-len(columns) // cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.6 * nrows), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    palette = plt.get_cmap("tab10").colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    for ax, column in zip(axes.flat, columns, strict=False):
        scale = 100.0 if column.percent else 1.0
        for i, row in enumerate(rows):
            m = row["metrics"].get(column.key)
            if m is None:
                continue
            value = scale * m["value"]
            err = [[max(0.0, value - scale * m["ci"][0])], [max(0.0, scale * m["ci"][1] - value)]]
            ax.bar(i, value, color=colors[row["method"]], yerr=err, capsize=2)
        if column.key in rows[0]["metrics"]:
            ax.axhline(scale * rows[0]["metrics"][column.key]["value"], color="black", lw=0.8, ls="--")
        direction = "lower" if column.lower_is_better else "higher"
        ax.set_title(f"{column.header} ({direction} is better)", fontsize=9)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=60, ha="right", fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    level = round(100 * report["confidence"])
    fig.suptitle(f"{title or report['model']} ({level}% bootstrap intervals; dashed: vanilla)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_compare(
    report: dict[str, Any],
    out: Path,
    *,
    name: str = "compare",
    title: str | None = None,
    note: str | None = None,
    legend: str = "",
) -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and, with matplotlib (``[evals]``), ``<name>.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    write_json(paths["json"], report)
    paths["markdown"].write_text(compare_markdown(report, title=title, note=note, legend=legend))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths
    if report["columns"] and report["rows"]:
        paths["plot"] = out / f"{name}.png"
        plot_compare(report, paths["plot"], title)
    return paths


__all__ = [
    "HEADLINE",
    "Benchmark",
    "Column",
    "Setting",
    "compare_markdown",
    "parse_settings",
    "plot_compare",
    "run_compare",
    "write_compare",
]
