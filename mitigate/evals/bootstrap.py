"""Paired bootstrap confidence intervals for a method against a baseline, over the same samples.

Both runs are resampled with the same indices (paired), within each stratum (POPE: per split, so every
resample keeps the split sizes), and every metric is recomputed from summed per-sample stats by the task's
own metric function. The interval is the percentile interval of the metric difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .results import flatten
from .tasks import Task


def _stat_arrays(task: type[Task], records: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    strata, vectors = zip(*(task.stats(r) for r in records), strict=True)
    return list(strata), np.stack(vectors)


def paired_bootstrap(
    task: type[Task],
    baseline: list[dict[str, Any]],
    method: list[dict[str, Any]],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Point values on the common samples and percentile CIs: of each run's metric and of the difference."""
    by_id = {r["sample_id"]: r for r in method}
    pairs = [(r, by_id[r["sample_id"]]) for r in baseline if r["sample_id"] in by_id]
    if not pairs:
        raise ValueError("the two runs have no sample in common")
    strata, a = _stat_arrays(task, [p[0] for p in pairs])
    strata_b, b = _stat_arrays(task, [p[1] for p in pairs])
    if strata != strata_b:
        raise ValueError("the same sample falls in different strata in the two runs")

    rng = np.random.default_rng(seed)
    sums_a: dict[str, np.ndarray] = {}
    sums_b: dict[str, np.ndarray] = {}
    full_a: dict[str, np.ndarray] = {}
    full_b: dict[str, np.ndarray] = {}
    labels = np.array(strata)
    for stratum in dict.fromkeys(strata):
        index = np.flatnonzero(labels == stratum)
        draws = rng.integers(0, len(index), size=(resamples, len(index)))
        weights = np.zeros((resamples, len(index)))
        np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)  # how often each sample is drawn
        sums_a[stratum] = weights @ a[index]
        sums_b[stratum] = weights @ b[index]
        full_a[stratum] = a[index].sum(0)
        full_b[stratum] = b[index].sum(0)

    point_a = flatten(task.metrics(full_a))
    point_b = flatten(task.metrics(full_b))
    boot_a = flatten(task.metrics(sums_a))
    boot_b = flatten(task.metrics(sums_b))
    tail = 100 * (1 - confidence) / 2
    out: dict[str, Any] = {
        "n_common": len(pairs),
        "resamples": resamples,
        "seed": seed,
        "confidence": confidence,
        "metrics": {},
    }
    for name in point_a:
        diff = boot_b[name] - boot_a[name]
        out["metrics"][name] = {
            "baseline": float(point_a[name]),
            "method": float(point_b[name]),
            "delta": float(point_b[name] - point_a[name]),
            "ci": [float(x) for x in np.percentile(diff, [tail, 100 - tail])],
            "ci_baseline": [float(x) for x in np.percentile(boot_a[name], [tail, 100 - tail])],
            "ci_method": [float(x) for x in np.percentile(boot_b[name], [tail, 100 - tail])],
        }
    return out
