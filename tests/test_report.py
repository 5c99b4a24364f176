"""``mitigate report`` over runs that did not score the same samples: every figure comes from the samples
all runs share, with its n; runs with nothing in common, or with different samples under the same ids, are
refused; the plot shows the paired differences."""

import json
from pathlib import Path

import pytest
import torch
from evals_fixtures import pope_record, write_run_folder
from typer.testing import CliRunner

from mitigate.cli import app
from mitigate.evals.report import compare_runs, plot

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


# Hand-written runs of one split: vanilla scored 6 samples, the method lost the last two. Over all 6,
# vanilla's accuracy is 3/6; over the 4 shared, 3/4: the two readings differ, as does the method.
VANILLA = [("yes", "yes"), ("no", "yes"), ("yes", "yes"), ("no", "no"), ("yes", "no"), ("no", "yes")]
METHOD = [("yes", "yes"), ("no", "no"), ("yes", "no"), ("no", "no")]


def test_mismatched_runs_are_compared_on_their_common_samples(tmp_path):
    full = write_run_folder(
        tmp_path / "vanilla-6", [pope_record(f"random/{i}", *lp) for i, lp in enumerate(VANILLA)]
    )
    short = write_run_folder(
        tmp_path / "vaf-4", [pope_record(f"random/{i}", *lp) for i, lp in enumerate(METHOD)], label="vaf"
    )
    assert json.loads((full / "results.json").read_text())["metrics"]["random"]["accuracy"] == 0.5
    result = runner.invoke(app, ["report", str(full), str(short), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["n_common"] == 4 and report["comparisons"]["vaf"]["n_common"] == 4
    assert [(r["n_scored"], r["n_left_out"]) for r in report["runs"]] == [(6, 2), (4, 0)]
    names = [f"random.{m}" for m in ("accuracy", "precision", "recall", "f1", "yes_ratio")] + ["mean_f1"]
    assert report["n"] == dict.fromkeys(names, 4)
    # The absolute figures come from the 4 shared samples only: tp, fp, tp, tn for vanilla (not the 3/6
    # accuracy of all its samples); tp, tn, fn, tn for the method.
    base = {"accuracy": 3 / 4, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "yes_ratio": 3 / 4}
    vaf = {"accuracy": 3 / 4, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 1 / 4}
    assert report["runs"][0]["metrics"] == pytest.approx(
        {f"random.{k}": v for k, v in base.items()} | {"mean_f1": 0.8}
    )
    assert report["runs"][1]["metrics"] == pytest.approx(
        {f"random.{k}": v for k, v in vaf.items()} | {"mean_f1": 2 / 3}
    )
    comp = report["comparisons"]["vaf"]["metrics"]
    assert [comp["mean_f1"][k] for k in ("baseline", "method", "delta")] == pytest.approx(
        [0.8, 2 / 3, 2 / 3 - 0.8]
    )
    assert comp["random.yes_ratio"]["delta"] == pytest.approx(-0.5)
    assert comp["random.accuracy"]["delta"] == pytest.approx(0.0)
    text = (tmp_path / "r" / "report.md").read_text()
    assert "computed on the 4 samples all runs scored (scored: vanilla 6, vaf 4)" in text
    assert "| metric | n | vanilla | vaf |" in text
    assert "| random.accuracy | 4 | 75.00 | 75.00 (+0.00 [" in text
    assert "| mean_f1 | 4 | 80.00 | 66.67 (-13.33 [" in text


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


def trihe_info(url: str, model: str = "judge-1") -> dict:
    """A Tri-HE run's task_info as an older version wrote it: the judge label named the URL."""
    label = f"LLM {model} at {url}; extraction by {model}, prompts abc123"
    extractor = {"url": url, "model": model, "prompts": "abc123"}
    judge = {"kind": "llm", "url": url, "model": model, "extractor": extractor, "label": label}
    return {"judge": judge, "note": f"Judge: {label}."}


def trihe_record(sample_id: str, hallu: float) -> dict:
    return {"sample_id": sample_id, "image_id": sample_id.split("/")[0], "question": f"q {sample_id}",
            "n_claims": 2, "n_judged": 2, "n_judge_errors": 0, "hallu": hallu, "object_hallu": hallu,
            "relation_hallu": 0.0, "image_weight": 1.0}  # fmt: skip


def test_the_judge_model_not_its_url_identifies_a_tri_he_scoring(tmp_path):
    """One judge model reached at localhost or at 127.0.0.1 is one scoring; another model is not."""
    records = [trihe_record("1/0", 0.5), trihe_record("2/0", 0.0)]
    base = write_run_folder(
        tmp_path / "v", records, task="trihe", task_info=trihe_info("http://localhost:8000/v1")
    )
    other_url = write_run_folder(
        tmp_path / "a", [trihe_record("1/0", 0.0), trihe_record("2/0", 0.0)], label="vaf", task="trihe",
        task_info=trihe_info("http://127.0.0.1:8000/v1"),
    )  # fmt: skip
    report = compare_runs([base, other_url], resamples=20)
    assert report["scoring"] == "judge LLM judge-1; extraction by judge-1, prompts abc123"
    assert report["comparisons"]["vaf"]["metrics"]["hallu_q"]["delta"] == pytest.approx(-0.25)
    other_model = write_run_folder(
        tmp_path / "b",
        records,
        label="pai",
        task="trihe",
        task_info=trihe_info("http://localhost:8000/v1", "j2"),
    )
    with pytest.raises(ValueError, match="scored differently"):
        compare_runs([base, other_model], resamples=20)
