"""``mitigate report`` over runs that did not score the same samples: every figure comes from the samples
all runs share, with its n; runs with nothing in common, or with different samples under the same ids, are
refused; the plot shows the paired differences."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mitigate.cli import app
from mitigate.evals.jsonl import read_jsonl
from mitigate.evals.report import compare_runs, plot
from mitigate.evals.results import flatten
from mitigate.evals.tasks import PopeTask

runner = CliRunner()
EVAL = ["eval", "pope", "--model", "builtin:tiny-llava", "--data", "builtin:sample", "--no-progress",
        "--max-new-tokens", "3"]  # fmt: skip


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path_factory):
    torch.set_num_threads(1)
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path_factory.getbasetemp() / "mitigate-cache"))


def evaluate(out: Path, *args) -> Path:
    result = runner.invoke(app, [*EVAL, *map(str, args), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "full": evaluate(root / "vanilla-4", "--limit", 4),
        "short": evaluate(root / "vaf-2", "--limit", 2, "--method", "vaf"),
        "random": evaluate(root / "pai-random", "--limit", 4, "--split", "random", "--method", "pai"),
        "seed1": evaluate(root / "pai-seed1", "--limit", 4, "--seed", 1, "--images", 6, "--method", "pai"),
    }


def test_mismatched_runs_are_compared_on_their_common_samples(runs, tmp_path):
    result = runner.invoke(
        app, ["report", str(runs["full"]), str(runs["short"]), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["n_common"] == 6 and report["comparisons"]["vaf"]["n_common"] == 6
    assert [r["n_scored"] for r in report["runs"]] == [12, 6]
    assert report["n"]["random.accuracy"] == 2 and report["n"]["mean_f1"] == 6
    # The absolute figures too come from the shared samples only, not from all 12 of the vanilla run.
    common = [
        r for r in read_jsonl(runs["full"] / "samples.jsonl") if r["sample_id"].split("/")[1] in ("1", "2")
    ]
    assert len(common) == 6
    assert report["runs"][0]["metrics"] == pytest.approx(flatten(PopeTask.aggregate(common)))
    comp = report["comparisons"]["vaf"]["metrics"]["mean_f1"]
    assert comp["baseline"] == pytest.approx(report["runs"][0]["metrics"]["mean_f1"])
    assert comp["method"] == pytest.approx(report["runs"][1]["metrics"]["mean_f1"])
    text = (tmp_path / "r" / "report.md").read_text()
    assert "computed on the 6 samples all runs scored (scored: vanilla 12, vaf 6)" in text
    assert (
        "| metric | n | vanilla | vaf |" in text
        and "| random.accuracy | 2 |" in text
        and "| mean_f1 | 6 |" in text
    )


def test_a_run_of_one_split_against_all_splits(runs):
    report = compare_runs([runs["full"], runs["random"]], resamples=50)
    assert report["n_common"] == 4 and set(report["n"]) == {f"random.{m}" for m in
        ("accuracy", "precision", "recall", "f1", "yes_ratio")} | {"mean_f1"}  # fmt: skip


def test_same_ids_but_other_questions_are_refused(runs, tmp_path):
    result = runner.invoke(
        app, ["report", str(runs["full"]), str(runs["seed1"]), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not the same sample in vanilla and pai" in result.output
    assert not (tmp_path / "r").exists()


def test_the_plot_shows_each_methods_paired_difference(runs, tmp_path):
    report = compare_runs([runs["full"], runs["short"]], resamples=100)
    drawn = plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert {d["metric"] for d in drawn} == set(report["n"]) and {d["method"] for d in drawn} == {"vaf"}
    for point in drawn:  # in percentage points, the interval around the delta
        comp = report["comparisons"]["vaf"]["metrics"][point["metric"]]
        assert point["delta"] == pytest.approx(100 * comp["delta"])
        assert [point["low"], point["high"]] == pytest.approx([100 * x for x in comp["ci"]])
