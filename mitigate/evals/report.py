"""``mitigate report``: several runs of one task compared with the vanilla run, with paired bootstrap CIs,
as JSON, a Markdown table and a PNG plot of each method's change against the baseline.

Only the samples that every run scored are used, for every figure (the absolute values too), and the
report says how many that is (``n_common``) beside the figures; runs with no sample in common, or whose
"same" sample ids are different questions or images, are refused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .bootstrap import paired_bootstrap
from .jsonl import write_json
from .results import flatten, fmt, load_run, markdown
from .tasks import scoring_label, task_class

log = logging.getLogger("mitigate")


def _label(results: dict[str, Any], folder: Path, taken: set[str]) -> str:
    label = results["method"]["label"]
    return label if label not in taken else f"{label} [{folder.name}]"


# Fields that say what a sample is: two runs' records of one sample_id must agree on them to be paired.
IDENTITY = ("split", "question_id", "question", "label", "image", "image_id")


def _common_records(runs: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """The sample ids every run scored, in the baseline's order, after checking that each is the same
    sample in every run (same question, label, image); refuses runs with nothing in common."""
    shared = set.intersection(*({r["sample_id"] for r in run["records"]} for run in runs))
    if not shared:
        sizes = ", ".join(f"{run['label']}: {len(run['records'])}" for run in runs)
        raise ValueError(
            f"the runs have no scored sample in common ({sizes} samples); compare runs over the same data"
        )
    first = {r["sample_id"]: r for r in base["records"]}
    for run in runs:
        if run is base:
            continue
        for record in run["records"]:
            sid = record["sample_id"]
            if sid not in shared:
                continue
            for name in IDENTITY:
                if name in record and name in first[sid] and record[name] != first[sid][name]:
                    raise ValueError(
                        f"sample {sid} is not the same sample in {base['label']} and {run['label']} ({name}: "
                        f"{first[sid][name]!r} vs {record[name]!r}): the runs were built from different data"
                    )
    return [r["sample_id"] for r in base["records"] if r["sample_id"] in shared]


def _sample_counts(task: type, records: list[dict[str, Any]], metrics: list[str]) -> dict[str, int]:
    """How many samples each figure is computed from: its stratum's (POPE: the split's), else all."""
    strata: dict[str, int] = {}
    for record in records:
        stratum = task.stats(record)[0]
        strata[stratum] = strata.get(stratum, 0) + 1
    return {m: strata.get(m.split(".", 1)[0], len(records)) if "." in m else len(records) for m in metrics}


def compare_runs(
    folders: list[Path],
    *,
    baseline: Path | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Every figure of the report, the absolute values included, is computed on the samples that all the
    runs scored (``n_common``); samples that some run lacks are left out, and the report says how many."""
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
    common = _common_records(runs, base)
    keep = set(common)
    for run in runs:
        run["common"] = [r for r in run["records"] if r["sample_id"] in keep]
    metrics = flatten(task.aggregate(base["common"]))
    report: dict[str, Any] = {
        "task": task.name,
        "baseline": base["label"],
        "models": sorted(models),
        "scoring": scoring.pop(),
        "n_common": len(common),
        "n": _sample_counts(task, base["common"], list(metrics)),
        "runs": [
            {
                "label": r["label"],
                "folder": r["folder"],
                "metrics": flatten(task.aggregate(r["common"])),
                "n_scored": len(r["records"]),
                "n_left_out": len(r["records"]) - len(common),
            }
            for r in runs
        ],
        "comparisons": {},
    }
    for run in runs:
        if run is base:
            continue
        report["comparisons"][run["label"]] = paired_bootstrap(
            task, base["common"], run["common"], resamples=resamples, seed=seed, confidence=confidence
        )
    return report


def _scoring(results: dict[str, Any]) -> str:
    """A parser, synonym table or judge change moves every number (see :func:`.tasks.scoring_of`)."""
    return scoring_label(results["task_info"])


def report_markdown(report: dict[str, Any]) -> str:
    labels = [r["label"] for r in report["runs"]]
    metrics = list(report["runs"][0]["metrics"])
    rows = []
    for name in metrics:
        row = [name, str(report["n"][name])]
        for run in report["runs"]:
            value = fmt(name, run["metrics"][name])
            comp = report["comparisons"].get(run["label"])
            if comp is not None and name in comp["metrics"]:
                m = comp["metrics"][name]
                lo, hi = m["ci"]
                value += f" ({_signed(name, m['delta'])} [{_signed(name, lo)}, {_signed(name, hi)}])"
            row.append(value)
        rows.append(row)
    scored = ", ".join(f"{r['label']} {r['n_scored']}" for r in report["runs"])
    left_out = any(r["n_left_out"] for r in report["runs"])
    coverage = (
        f"Every figure is computed on the {report['n_common']} samples all runs scored (scored: {scored}); "
        + ("samples that some run lacks are left out. " if left_out else "every run scored exactly these. ")
        + "n: the samples behind each figure (a POPE split's figures: that split's).\n\n"
    )
    head = (
        f"# {report['task'].upper()}: methods against {report['baseline']}\n\n"
        f"Model(s): {', '.join(report['models'])}; scoring: {report['scoring']}. Rates in %. "
        "In brackets: the change against "
        f"{report['baseline']} with its {_conf(report)} paired bootstrap interval.\n\n"
    )
    return head + coverage + markdown(["metric", "n", *labels], rows)


def _conf(report: dict[str, Any]) -> str:
    comps = list(report["comparisons"].values())
    if not comps:
        return "95%"
    return f"{100 * comps[0]['confidence']:.0f}%, {comps[0]['resamples']} resamples,"


def _signed(name: str, value: float) -> str:
    text = fmt(name, abs(value))
    return ("-" if value < 0 else "+") + text


def plot(report: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """What a reader of the report needs: each method's change against the baseline, with its paired
    bootstrap interval, per metric (rates in percentage points on one shared axis; other metrics, such as
    CHAIR's caption length, each on their own), and a line at zero. Returns the points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(report["runs"][0]["metrics"])
    rates = [m for m in metrics if fmt(m, 1.0) == "100.00"]
    panels = ([("change (percentage points)", rates, 100.0)] if rates else []) + [
        (f"change ({m})", [m], 1.0) for m in metrics if m not in rates
    ]
    comps = report["comparisons"]
    colors = plt.get_cmap("tab10").colors
    heights = [max(1.6, 0.32 * len(names) * max(1, len(comps)) + 0.9) for _, names, _ in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7.5, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    width = 0.7 / max(1, len(comps))
    drawn: list[dict[str, Any]] = []
    for ax, (title, names, scale) in zip(axes[:, 0], panels, strict=True):
        for j, (label, comp) in enumerate(comps.items()):
            ys = [i - 0.35 + width * (j + 0.5) for i in range(len(names))]
            deltas = [comp["metrics"][n]["delta"] * scale for n in names]
            lows = [d - comp["metrics"][n]["ci"][0] * scale for d, n in zip(deltas, names, strict=True)]
            highs = [comp["metrics"][n]["ci"][1] * scale - d for d, n in zip(deltas, names, strict=True)]
            ax.errorbar(
                deltas, ys, xerr=[lows, highs], fmt="o", ms=4, capsize=3, color=colors[j % len(colors)],
                label=label,
            )  # fmt: skip
            drawn += [
                {"metric": n, "method": label, "delta": d, "low": d - lo, "high": d + hi}
                for n, d, lo, hi in zip(names, deltas, lows, highs, strict=True)
            ]
        ax.axvline(0.0, color="0.4", lw=0.8)
        ax.set_yticks(range(len(names)), [f"{n} (n={report['n'][n]})" for n in names], fontsize=7)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_xlabel(title, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", color="0.9")
    if comps:
        axes[0, 0].legend(fontsize=7, loc="best")
    else:
        axes[0, 0].text(
            0.5, 0.5, "only the baseline: nothing to compare", ha="center", transform=axes[0, 0].transAxes
        )
    fig.suptitle(
        f"{report['task'].upper()}: change against {report['baseline']} "
        f"({_conf(report).split(',')[0]} paired bootstrap intervals, {report['n_common']} shared samples)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


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
