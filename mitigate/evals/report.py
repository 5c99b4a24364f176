"""``mitigate report``: several runs of one task compared with the vanilla run, with paired bootstrap CIs,
as JSON, a Markdown table and a PNG plot of each metric by method."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .bootstrap import paired_bootstrap
from .jsonl import write_json
from .results import flatten, fmt, load_run, markdown
from .tasks import task_class

log = logging.getLogger("mitigate")


def _label(results: dict[str, Any], folder: Path, taken: set[str]) -> str:
    label = results["method"]["label"]
    return label if label not in taken else f"{label} [{folder.name}]"


def compare_runs(
    folders: list[Path],
    *,
    baseline: Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    runs = []
    taken: set[str] = set()
    for folder in folders:
        results, records = load_run(folder)
        label = _label(results, Path(folder), taken)
        taken.add(label)
        runs.append({"folder": str(folder), "label": label, "results": results, "records": records})
    tasks = {r["results"]["task"] for r in runs}
    if len(tasks) != 1:
        raise ValueError(f"runs of different tasks cannot be compared: {', '.join(sorted(tasks))}")
    task = task_class(tasks.pop())
    if baseline is not None:
        matches = [r for r in runs if Path(r["folder"]).resolve() == Path(baseline).resolve()]
        if not matches:
            results, records = load_run(baseline)
            matches = [
                {
                    "folder": str(baseline),
                    "label": _label(results, Path(baseline), taken),
                    "results": results,
                    "records": records,
                }
            ]
            runs.insert(0, matches[0])
    else:
        matches = [r for r in runs if r["results"]["method"]["label"] == "vanilla"]
        if len(matches) != 1:
            found = "no vanilla run" if not matches else f"{len(matches)} vanilla runs"
            raise ValueError(f"{found} among the runs; name the baseline with --baseline RUN")
    base = matches[0]
    models = {r["results"]["model"]["model"] for r in runs}
    scoring = {_scoring(r["results"]) for r in runs}
    if len(scoring) > 1:  # a parser or synonym table change moves every number: not a method effect
        raise ValueError(
            f"the runs were scored differently ({'; '.join(sorted(scoring))}); rescore them alike"
        )
    report: dict[str, Any] = {
        "task": task.name,
        "baseline": base["label"],
        "models": sorted(models),
        "scoring": scoring.pop(),
        "runs": [
            {
                "label": r["label"],
                "folder": r["folder"],
                "metrics": flatten(r["results"]["metrics"]),
                "n_scored": r["results"]["n_scored"],
            }
            for r in runs
        ],
        "comparisons": {},
    }
    for run in runs:
        if run is base:
            continue
        report["comparisons"][run["label"]] = paired_bootstrap(
            task, base["records"], run["records"], resamples=resamples, seed=seed, confidence=confidence
        )
    return report


def _scoring(results: dict[str, Any]) -> str:
    info = results["task_info"]
    if info.get("judge"):  # Tri-HE: another judge (or prompt version) moves every number
        return f"judge {info['judge']['label']}"
    if "parser" in info:
        return f"parser {info['parser']}"
    table = info.get("synonyms", {})
    return f"synonyms {table.get('table')} {table.get('sha256', '')}".strip()


def report_markdown(report: dict[str, Any]) -> str:
    labels = [r["label"] for r in report["runs"]]
    metrics = list(report["runs"][0]["metrics"])
    rows = []
    for name in metrics:
        row = [name]
        for run in report["runs"]:
            value = fmt(name, run["metrics"][name])
            comp = report["comparisons"].get(run["label"])
            if comp is not None and name in comp["metrics"]:
                m = comp["metrics"][name]
                lo, hi = m["ci"]
                value += f" ({_signed(name, m['delta'])} [{_signed(name, lo)}, {_signed(name, hi)}])"
            row.append(value)
        rows.append(row)
    head = (
        f"# {report['task'].upper()}: methods against {report['baseline']}\n\n"
        f"Model(s): {', '.join(report['models'])}; scoring: {report['scoring']}. Rates in %. "
        "In brackets: the change against "
        f"{report['baseline']} with its {_conf(report)} paired bootstrap interval over the samples both runs "
        "scored.\n\n"
    )
    return head + markdown(["metric", *labels], rows)


def _conf(report: dict[str, Any]) -> str:
    comps = list(report["comparisons"].values())
    if not comps:
        return "95%"
    return f"{100 * comps[0]['confidence']:.0f}%, {comps[0]['resamples']} resamples,"


def _signed(name: str, value: float) -> str:
    text = fmt(name, abs(value))
    return ("-" if value < 0 else "+") + text


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: a bar per method with its own bootstrap interval; the baseline first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in report["runs"]]
    metrics = list(report["runs"][0]["metrics"])
    cols = min(5, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, name in zip(axes.flat, metrics, strict=False):
        scale = 100.0 if fmt(name, 1.0) == "100.00" else 1.0
        for i, run in enumerate(report["runs"]):
            value = run["metrics"][name] * scale
            comp = report["comparisons"].get(run["label"])
            if comp is None:  # the baseline: its interval from any comparison
                comp = next(iter(report["comparisons"].values()), None)
                ci = comp["metrics"][name]["ci_baseline"] if comp else None
            else:
                ci = comp["metrics"][name]["ci_method"]
            err = None
            if ci is not None:
                err = [[max(0.0, value - ci[0] * scale)], [max(0.0, ci[1] * scale - value)]]
            ax.bar(i, value, color=colors[i % len(colors)], yerr=err, capsize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(
        f"{report['task'].upper()} by method (bars: {_conf(report).split(',')[0]} bootstrap intervals)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.json``, ``report.md`` and, when matplotlib is installed (``[evals]``), ``report.png``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    write_json(paths["json"], report)
    paths["markdown"].write_text(report_markdown(report))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("no plot: it needs matplotlib (pip install 'mitigate[evals]')")
        return paths
    paths["plot"] = out / "report.png"
    plot(report, paths["plot"])
    return paths
