"""``mitigate compare`` on builtin:toy-llava: vanilla and two methods on POPE, CHAIR and Tri-HE (fake judge),
the table checked against each run folder's own results, and a rerun served by the runner's cache."""

import json

import pytest
import torch
import typer
from trihe_fixtures import FakeOpenAI, generic, write_trihe
from typer.testing import CliRunner

from mitigate.evals.cli import register
from mitigate.evals.compare import Setting, parse_settings
from mitigate.evals.results import flatten, load_run

runner = CliRunner()


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path_factory):
    torch.set_num_threads(1)
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path_factory.getbasetemp() / "mitigate-cache"))


def invoke(*args, code=0):
    app = typer.Typer()
    register(app)
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def test_parse_settings():
    available = ["var", "gift", "vhr"]
    assert [s.label for s in parse_settings("all", available)] == ["vanilla", "var", "gift", "vhr"]
    settings = parse_settings("vanilla, var-paper,var+vhr,var-paper", available)
    assert settings == [Setting("vanilla"), Setting("var-paper", "var-paper"), Setting("var+vhr", "var,vhr")]
    with pytest.raises(ValueError, match="names no method"):
        parse_settings("none", available)


def test_compare_table_matches_the_runs(tmp_path):
    data, images = write_trihe(tmp_path / "trihe")
    runs = tmp_path / "runs"
    args = ["compare", "--model", "builtin:toy-llava", "--methods", "vaf,pai",
            "--benchmarks", "pope,chair,trihe", "--data", "builtin:shapes", "--trihe-data", data,
            "--image-root", images, "--limit", 2,
            "--max-new-tokens", 12, "--resamples", 50, "--runs", runs, "--no-progress"]  # fmt: skip
    with FakeOpenAI(generic()) as server:
        judge = ["--judge-url", server.url, "--judge-model", "m"]
        invoke(*args, *judge)
        calls = server.calls
        report = json.loads((runs / "compare.json").read_text())
        rows = {r["label"]: r for r in report["rows"]}
        assert list(rows) == ["vanilla", "vaf", "pai"] and report["benchmarks"] == ["pope", "chair", "trihe"]
        for label, row in rows.items():
            assert row["method"] == label
            for bench in ("pope", "chair", "trihe"):
                results, _ = load_run(row["folders"][bench])
                assert results["method"]["label"] == label and row["n"][bench] == results["n_scored"] > 0
                base, _ = load_run(rows["vanilla"]["folders"][bench])
                own, vanilla = flatten(results["metrics"]), flatten(base["metrics"])
                for name, value in own.items():  # every sample is common: the table is the runs' own numbers
                    cell = row["metrics"][f"{bench}.{name}"]
                    assert cell["value"] == pytest.approx(value)
                    assert cell["delta"] == pytest.approx(value - vanilla[name])
        assert rows["vaf"]["resolved"] and rows["vanilla"]["resolved"] == {}
        assert rows["vanilla"]["folders"]["pope"] == str(runs / "pope-vanilla")

        markdown = (runs / "compare.md").read_text()
        pope = rows["pai"]["metrics"]["pope.mean_f1"]
        assert f"| pai | {100 * pope['value']:.1f} [" in markdown
        assert f"{100 * pope['delta']:+.1f} [" in markdown.split("## Change against vanilla")[1]
        assert "Hallu-I" in markdown and "CHAIR_i" in markdown and (runs / "compare.png").stat().st_size > 0

        # A rerun generates nothing and calls no judge: every answer and verdict is cached.
        before = {p: p.read_text() for p in runs.glob("*/predictions.jsonl")}
        assert len(before) == 9
        invoke(*args, *judge)
        assert {p: p.read_text() for p in runs.glob("*/predictions.jsonl")} == before
        assert server.calls == calls


def test_compare_needs_its_inputs(tmp_path):
    result = invoke("compare", "--model", "builtin:toy-llava", "--benchmarks", "pope,mmlu", code=2)
    assert "--benchmarks" in result.output
    result = invoke("compare", "--model", "builtin:toy-llava", "--benchmarks", "trihe", code=2)
    assert "--trihe-data" in result.output
