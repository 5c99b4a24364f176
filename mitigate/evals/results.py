"""A run folder: ``results.json`` (settings and metrics), ``samples.jsonl`` (one record per sample),
``results.md`` (the metrics as a Markdown table), plus the ``predictions.jsonl`` cache.

Rates are stored as fractions in JSON and shown as percentages in tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .jsonl import read_jsonl, write_json, write_jsonl

RESULTS = "results.json"
SAMPLES = "samples.jsonl"
MARKDOWN = "results.md"
RATE_METRICS = {"accuracy", "precision", "recall", "f1", "yes_ratio", "mean_f1", "chair_s", "chair_i"}
RATE_METRICS |= {"hallu_i", "hallu_q", "object_hallu_i", "object_hallu_q", "relation_hallu_i",  # Tri-HE
                 "relation_hallu_q", "judge_error_rate"}  # fmt: skip


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"random": {"f1": x}, "mean_f1": y}`` -> ``{"random.f1": x, "mean_f1": y}``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def fmt(metric: str, value: float) -> str:
    base = metric.rsplit(".", 1)[-1]
    return f"{100 * value:.2f}" if base in RATE_METRICS else f"{value:.2f}"


def metric_rows(task: str, metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A table of metrics: POPE as one row per split, CHAIR as one row."""
    if task == "pope":
        names = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
        rows = [[s, *(fmt(n, v[n]) for n in names)] for s, v in metrics.items() if isinstance(v, dict)]
        rows.append(["mean F1", "", "", "", fmt("f1", metrics["mean_f1"]), ""])
        return ["split", *names], rows
    names = list(metrics)
    return names, [[fmt(n, metrics[n]) for n in names]]


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_markdown(results: dict[str, Any]) -> str:
    title = f"# {results['task'].upper()}: {results['model']['model']}, {results['method']['label']}\n\n"
    if not results["metrics"]:
        return title + (
            f"No sample could be scored: all {results['n_errors']} failed. The errors are in errors.jsonl.\n"
        )
    headers, rows = metric_rows(results["task"], results["metrics"])
    notes = f"\n{results['n_scored']} samples scored, {results['n_errors']} errors. Rates in %.\n"
    if results["task"] == "chair":
        notes += f"Synonym table: {results['task_info']['synonyms'].get('table')}.\n"
    elif "note" in results["task_info"]:  # Tri-HE: the judge and what could not be scored
        notes += results["task_info"]["note"] + "\n"
    else:
        notes += f"Parser: {results['task_info']['parser']}.\n"
    return title + markdown(headers, rows) + notes


def write_run(folder: Path, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / SAMPLES, records)
    write_json(folder / RESULTS, results)
    (folder / MARKDOWN).write_text(run_markdown(results))


def load_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    folder = Path(folder)
    path = folder / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run folder (no {RESULTS})")
    results = json.loads(path.read_text())
    return results, read_jsonl(folder / SAMPLES, required=("sample_id",))
