"""The eval, score and report commands end to end on builtin:tiny-llava and builtin:sample, offline: the
run folder, the prediction cache and its keys, resuming, per-sample errors, clear setup errors, reports."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from evals_fixtures import write_coco, write_lines
from typer.testing import CliRunner

from mitigate.builtin import coco_sample
from mitigate.builtin.tiny_llava import VOCAB
from mitigate.evals.cache import PredictionCache
from mitigate.evals.cli import register
from mitigate.evals.jsonl import append_jsonl, read_jsonl
from mitigate.evals.parallel import Shard
from mitigate.evals.pope import question_text
from mitigate.evals.runner import GenerationConfig, run_key

runner = CliRunner()
MODEL = ["--model", "builtin:tiny-llava", "--data", "builtin:sample", "--no-progress"]


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path_factory):
    # One thread: the tiny model gains nothing from more, and loses a lot on a busy 2-core machine.
    torch.set_num_threads(1)
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path_factory.getbasetemp() / "mitigate-cache"))


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def invoke(app, *args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def lines(path: Path) -> list[dict]:
    return read_jsonl(path)


def test_builtin_sample_is_a_deterministic_coco_dataset(tmp_path):
    root = coco_sample.ensure_sample(tmp_path / "a")
    again = coco_sample.ensure_sample(tmp_path / "b")
    for name in ("instances_val2014.json", "captions_val2014.json"):
        assert (root / "annotations" / name).read_bytes() == (again / "annotations" / name).read_bytes()
    instances = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    assert 12 <= len(instances["images"]) <= 24
    assert {c["name"] for c in instances["categories"]} <= set(VOCAB)  # words the tiny model knows
    for image in instances["images"]:
        assert image["file_name"] == f"COCO_val2014_{image['id']:012d}.jpg"
        assert (root / "val2014" / image["file_name"]).is_file()
    assert coco_sample.ensure_sample(tmp_path / "a") == root  # made once


@pytest.mark.parametrize("model", ["builtin:tiny-llava-next", "builtin:tiny-gemma3"])
def test_eval_runs_other_families(app, tmp_path, model):
    """The runner's batches go through each family's processor (Gemma 3's wants one image list per row)."""
    out = tmp_path / "run"
    invoke(app, "eval", "pope", "--model", model, "--data", "builtin:sample", "--no-progress",
           "--limit", 2, "--batch-size", 3, "--method", "vaf", "--out", out)  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["n_scored"] == 6 and results["n_errors"] == 0


def test_eval_pope_end_to_end_and_resume(app, tmp_path):
    out = tmp_path / "run"
    result = invoke(app, "eval", "pope", *MODEL, "--limit", 3, "--batch-size", 4, "--out", out)
    assert "mean F1" in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["n_samples"] == results["n_scored"] == 9 and results["n_errors"] == 0
    assert set(results["metrics"]) == {"random", "popular", "adversarial", "mean_f1"}
    assert set(results["metrics"]["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert results["method"]["label"] == "vanilla" and results["task_info"]["data"] == "builtin:sample"
    samples = lines(out / "samples.jsonl")
    assert [s["sample_id"] for s in samples][:4] == ["random/1", "random/2", "random/3", "popular/1"]
    assert samples[0]["question"] == question_text(samples[0]["question"].split()[3])
    assert (out / "results.md").read_text().startswith("# POPE: builtin:tiny-llava, vanilla")

    # More samples in the same folder: only the new ones are generated; each answer is there once.
    first = lines(out / "predictions.jsonl")
    invoke(app, "eval", "pope", *MODEL, "--limit", 5, "--batch-size", 4, "--out", out)
    second = lines(out / "predictions.jsonl")
    assert second[: len(first)] == first and len(second) == 15
    assert len({p["sample_id"] for p in second}) == 15
    # Nothing new to do: the file is unchanged and the metrics are the same.
    invoke(app, "eval", "pope", *MODEL, "--limit", 5, "--batch-size", 2, "--out", out)
    assert lines(out / "predictions.jsonl") == second


def test_cache_key_has_method_parameters_but_not_the_kernel(app, tmp_path):
    out = tmp_path / "var"
    invoke(app, "eval", "pope", *MODEL, "--method", "var", "--limit", 2, "--split", "random", "--out", out)
    results = json.loads((out / "results.json").read_text())
    assert results["method"]["resolved"]["var"]["tau"] == 2.5  # the tiny model's preset, resolved
    n = len(lines(out / "predictions.jsonl"))
    invoke(
        app,
        "eval",
        "pope",
        *MODEL,
        "--method",
        "var",
        "--kernel",
        "reference",
        "--limit",
        2,
        "--split",
        "random",
        "--out",
        out,
    )
    assert len(lines(out / "predictions.jsonl")) == n
    # Another parameter value is another run: not into this folder (its results would be overwritten), and
    # with these answers in its cache, it still generates every answer anew.
    tau3 = ["eval", "pope", *MODEL, "--method", "var", "--set", "tau=3", "--limit", "2", "--split", "random"]
    refused = runner.invoke(app, [*tau3, "--out", str(out)])
    assert refused.exit_code == 2 and "holds another run" in refused.output and "tau" in refused.output
    other = tmp_path / "var-tau3"
    other.mkdir()
    shutil.copy(out / "predictions.jsonl", other / "predictions.jsonl")
    invoke(app, *tau3, "--out", other)
    assert len(lines(other / "predictions.jsonl")) == 2 * n
    gen = GenerationConfig(8)
    model = {"model": "m"}
    assert run_key(model, {"var": {"tau": 1}}, gen) != run_key(model, {"var": {"tau": 2}}, gen)
    assert run_key(model, {}, gen) != run_key(model, {}, GenerationConfig(9))


def test_cache_survives_a_torn_last_line(tmp_path):
    cache = PredictionCache(tmp_path)
    append_jsonl(cache.main, [{"key": "a", "sample_id": "1", "text": "x"}])
    with cache.main.open("a") as handle:
        handle.write('{"key": "b", "sample_id": "2", "te')  # a writer killed mid-line
    assert set(cache.load()) == {"a"}
    cache.prepare()
    cache.append([{"key": "b", "sample_id": "2", "text": "y"}])
    assert [r["key"] for r in lines(cache.main)] == ["a", "b"]
    # Shards written by other processes are read and merged once into the main file.
    shard = PredictionCache(tmp_path, Shard(1, 2))
    shard.prepare()
    shard.append([{"key": "c", "sample_id": "3", "text": "z"}, {"key": "a", "sample_id": "1", "text": "x"}])
    assert set(cache.load()) == {"a", "b", "c"}
    cache.merge()
    assert [r["key"] for r in lines(cache.main)] == ["a", "b", "c"] and not cache.shard_files()


def test_bad_images_are_per_sample_errors_and_the_run_goes_on(app, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_sample.ensure_sample(), root)
    instances = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    broken, missing = instances["images"][0]["file_name"], instances["images"][1]["file_name"]
    (root / "val2014" / broken).write_bytes(b"not a jpeg")
    (root / "val2014" / missing).unlink()
    out = tmp_path / "run"
    invoke(
        app,
        "eval",
        "chair",
        "--model",
        "builtin:tiny-llava",
        "--coco-root",
        root,
        "--no-progress",
        "--max-new-tokens",
        6,
        "--out",
        out,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["n_errors"] == 2 and results["n_scored"] == results["n_samples"] - 2
    errors = {e["sample_id"]: e["error"] for e in lines(out / "errors.jsonl")}
    ids = {str(instances["images"][k]["id"]) for k in (0, 1)}
    assert set(errors) == ids
    assert any("cannot be read" in e for e in errors.values()) and any(
        "not found" in e for e in errors.values()
    )
    assert results["task_info"]["synonyms"]["table"] == "built-in"
    assert set(results["metrics"]) == {"chair_s", "chair_i", "recall", "length"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["eval", "pope", "--model", "builtin:tiny-llava", "--coco-root", "/nonexistent/coco"],
            "is not a folder",
        ),
        (["eval", "pope", "--model", "builtin:tiny-llava"], "no data: give --coco-root"),
        (["eval", "pope", *MODEL, "--split", "hard"], "unknown POPE split 'hard'"),
        (["eval", "pope", *MODEL, "--parser", "llava"], "unknown POPE parser 'llava'"),
        (["eval", "pope", *MODEL, "--set", "tau=3"], "--set needs a method"),
        (["eval", "pope", *MODEL, "--method", "vra", "--limit", "1"], "unknown method or preset 'vra'"),
        (["eval", "chair", *MODEL, "--synonyms", "/nonexistent.txt"], "--synonyms /nonexistent.txt"),
    ],
)
def test_setup_errors_are_one_clear_line(app, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_missing_annotations_name_the_file(app, tmp_path):
    (tmp_path / "annotations").mkdir()
    result = runner.invoke(
        app, ["eval", "chair", "--model", "builtin:tiny-llava", "--coco-root", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "instances_val2014.json not found" in result.output and "expected COCO's layout" in result.output


def test_score_commands(app, tmp_path):
    questions = write_lines(
        tmp_path / "coco_pope_random.json",
        [
            {
                "question_id": 1,
                "image": "COCO_val2014_000000000001.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "COCO_val2014_000000000001.jpg",
                "text": "Is there a cat in the image?",
                "label": "no",
            },
        ],
        crlf=True,
    )
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "text": "I don\'t think so"}\n')
    invoke(app, "score", "pope", "--questions", questions, "--answers", answers, "--parser", "opera")
    metrics = json.loads((tmp_path / "answers.pope_metrics.json").read_text())["metrics"]
    assert metrics["random"]["accuracy"] == 1.0 and metrics["mean_f1"] == 1.0
    invoke(app, "score", "pope", "--questions", questions, "--answers", answers, "--out", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["random"]["accuracy"] == 0.5  # pope: yes

    answers.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2 "text": "no"}\n')
    result = runner.invoke(app, ["score", "pope", "--questions", str(questions), "--answers", str(answers)])
    assert result.exit_code == 2 and f"{answers}:2: not valid JSON" in result.output

    root = write_coco(tmp_path / "coco", {5: ["dog"]}, {5: ["A puppy on a sofa."]})
    captions = write_lines(
        tmp_path / "caps.jsonl", [{"image_id": 5, "caption": "A dog and a cat on a couch."}]
    )
    invoke(app, "score", "chair", "--captions", captions, "--coco-root", root, "--out", tmp_path / "c.json")
    chair = json.loads((tmp_path / "c.json").read_text())["metrics"]
    assert chair == pytest.approx({"chair_s": 1.0, "chair_i": 1 / 3, "recall": 1.0, "length": 9.0})


def test_report_compares_against_vanilla_with_intervals(app, tmp_path):
    runs = []
    for method in ("vanilla", "var"):
        out = tmp_path / method
        invoke(app, "eval", "pope", *MODEL, "--method", method, "--limit", 4, "--out", out)
        runs.append(out)
    invoke(app, "report", *runs, "--out", tmp_path / "report", "--resamples", 200)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["baseline"] == "vanilla" and list(report["comparisons"]) == ["var"]
    comp = report["comparisons"]["var"]
    assert comp["n_common"] == 12 and comp["resamples"] == 200
    f1 = comp["metrics"]["mean_f1"]
    assert f1["ci"][0] <= f1["delta"] <= f1["ci"][1]
    assert f1["delta"] == pytest.approx(f1["method"] - f1["baseline"])
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mean_f1 |" in (tmp_path / "report" / "report.md").read_text()
    result = runner.invoke(app, ["report", str(runs[1]), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "no vanilla run" in result.output


def test_pope_needs_no_evals_extras():
    # POPE runs on a plain install; only CHAIR and plots need nltk, textblob and matplotlib.
    code = (
        "import sys, mitigate.evals.cli, mitigate.evals.evaluate, mitigate.evals.score, "
        "mitigate.evals.report; "
        "print(sorted({'nltk', 'textblob', 'matplotlib'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"
