"""``mitigate compare`` on builtin:toy-llava: vanilla and two methods on POPE, CHAIR and Tri-HE (fake judge),
the table checked against each run folder's own results, and a rerun served by the runner's cache."""

import json

import pytest
import torch
import typer
from evals_fixtures import pope_record, write_run_folder
from trihe_fixtures import FakeOpenAI, generic, write_trihe
from typer.testing import CliRunner

from mitigate.errors import ConfigError, MitigationError, RunFolderError, UnsupportedModelError
from mitigate.evals import compare
from mitigate.evals.cli import register
from mitigate.evals.compare import Benchmark, Setting, parse_settings
from mitigate.evals.results import flatten, load_run
from mitigate.evals.tasks import PopeTask

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


# -- run_compare's own rules, on hand-written run folders (no model) ---------------------------------
class _Pope(PopeTask):
    def info(self):
        return {"parser": self.parser}


PAIRS = {  # sample -> (label, prediction); vanilla lost random/4, vaf lost random/3
    "vanilla": {0: ("yes", "yes"), 1: ("no", "yes"), 2: ("yes", "yes"), 3: ("no", "no")},
    "vaf": {0: ("yes", "yes"), 1: ("no", "no"), 2: ("yes", "no"), 4: ("no", "no")},
}


@pytest.fixture
def fake_runs(monkeypatch):
    """``evaluate`` replaced: vanilla and vaf write hand-written run folders; paint is refused for the
    model's family; pai fails for another reason (a run folder that holds another run)."""
    calls = []

    def evaluate(task, cfg):
        calls.append(cfg.method)
        if cfg.method == "paint":
            raise UnsupportedModelError("paint cannot run on this qwen2_vl model: it needs a CLS token")
        if cfg.method == "pai":
            raise RunFolderError(f"run folder {cfg.out} holds another run")
        records = [pope_record(f"random/{i}", *lp) for i, lp in PAIRS[cfg.method].items()]
        write_run_folder(cfg.out, records, label=cfg.method)
        return {"n_scored": len(records)}

    monkeypatch.setattr(compare, "evaluate", evaluate)
    return calls


def test_only_a_family_refusal_skips_a_setting(tmp_path, fake_runs):
    bench = [Benchmark("pope", _Pope(None))]
    report = compare.run_compare("m", parse_settings("vaf,paint", ["vaf"]), bench, tmp_path, resamples=20)
    assert [r["label"] for r in report["rows"]] == ["vanilla", "vaf"] and "CLS token" in report["skipped"][
        "paint"
    ]
    with pytest.raises(RunFolderError, match="holds another run"):  # not skipped as if refused
        compare.run_compare("m", parse_settings("pai,vaf", ["vaf"]), bench, tmp_path, resamples=20)


def test_every_method_is_resolved_before_anything_runs(tmp_path, fake_runs):
    bench = [Benchmark("pope", _Pope(None))]
    for methods, message in (("vra,vaf", "Did you mean"), ("vaf,var+vhr+var", "named twice")):
        with pytest.raises(MitigationError, match=message):
            compare.run_compare("m", parse_settings(methods, []), bench, tmp_path, resamples=20)
    settings = [Setting("vanilla"), Setting("var-x", "var", {"tau": "abc"})]
    with pytest.raises(ConfigError, match="tau: Input should be a valid number"):
        compare.run_compare("m", settings, bench, tmp_path, resamples=20)
    assert fake_runs == []  # nothing ran, vanilla included


def test_n_is_the_number_of_samples_shared_with_vanilla(tmp_path, fake_runs):
    """vaf scored 4 samples, but shares 3 with vanilla: its figures (paired bootstrap) come from those 3."""
    bench = [Benchmark("pope", _Pope(None))]
    report = compare.run_compare("m", parse_settings("vaf", []), bench, tmp_path, resamples=20)
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["vanilla"]["n"] == {"pope": 4} and rows["vaf"]["n"] == {"pope": 3}
    assert rows["vaf"]["n_scored"] == {"pope": 4}
    # on the 3 shared samples (0, 1, 2): vaf is right on 2 of 3, vanilla on 2 of 3
    assert rows["vaf"]["metrics"]["pope.random.accuracy"]["value"] == pytest.approx(2 / 3)
    markdown = compare.compare_markdown(report)
    assert "- vanilla (n: pope 4)" in markdown and "- vaf (n: pope 3; scored: pope 4)" in markdown
