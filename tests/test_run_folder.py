"""Run folders that cannot be raced or corrupted: a lock naming its holder, a stale lock taken over, one
run's results per folder, corrupt cache lines quarantined and regenerated. Offline, on builtin:tiny-llava."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mitigate.cli import app
from mitigate.errors import RunFolderError
from mitigate.evals.jsonl import read_jsonl
from mitigate.evals.runfolder import LOCK, RunLock, claim
from mitigate.evals.synonyms import BUILTIN, load_table
from mitigate.evals.tasks import scoring_of

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
EVAL = ["eval", "pope", "--model", "builtin:tiny-llava", "--data", "builtin:sample", "--no-progress",
        "--max-new-tokens", "4"]  # fmt: skip


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path_factory):
    torch.set_num_threads(1)
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path_factory.getbasetemp() / "mitigate-cache"))


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def keys(out: Path) -> list[str]:
    return [r["key"] for r in read_jsonl(out / "predictions.jsonl")]


def test_two_runs_started_at_once_on_one_folder(tmp_path):
    """One runs, the other refuses and names it (or, if they did not overlap, finds everything done); the
    cache ends with every answer exactly once."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MITIGATE_CACHE=os.environ["MITIGATE_CACHE"])
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [
        sys.executable,
        "-m",
        "mitigate.evals",
        *EVAL,
        "--limit",
        "10",
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    processes = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    done = [(p.wait(timeout=600), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in done)
    assert codes in ([0, 0], [0, 2]), done
    for code, _, stderr in done:
        assert "Traceback" not in stderr
        if code == 2:
            assert stderr.strip().startswith(f"Error: run folder {out} is in use by pid"), stderr
            assert socket.gethostname() in stderr
    answers = keys(out)
    assert len(answers) == len(set(answers)) == 30
    assert not (out / LOCK).exists()  # released at the end


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": 0, "command": "mitigate eval pope"}
    (out / LOCK).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="mitigate"):
        invoke(*EVAL, "--limit", "1", "--split", "random", "--out", out)
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert len(keys(out)) == 1 and not (out / LOCK).exists()


def test_a_lock_from_another_host_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": 0}))
    result = runner.invoke(app, [*EVAL, "--limit", "1", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pid 1 on host elsewhere.example" in result.output and f"delete {out / LOCK}" in result.output
    assert not (out / "predictions.jsonl").exists()


def test_a_held_lock_refuses_and_is_released_after_a_failed_run(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        result = runner.invoke(app, [*EVAL, "--limit", "1", "--out", str(out)])
        assert result.exit_code == 2 and f"in use by pid {os.getpid()}" in result.output
        with pytest.raises(Exception, match="in use by"):
            RunLock(out).acquire()
    # a run that fails after taking the lock releases it
    result = runner.invoke(app, [*EVAL, "--attn-implementation", "magic", "--out", str(out)])
    assert result.exit_code == 2 and not (out / LOCK).exists()
    invoke(*EVAL, "--limit", "1", "--split", "random", "--out", out)


def test_different_runs_never_share_a_folder(tmp_path):
    out = tmp_path / "run"
    invoke(*EVAL, "--limit", "1", "--split", "random", "--out", out)
    before = (out / "results.json").read_bytes()
    for other in (["--method", "var"], ["--max-new-tokens", "5"], ["--parser", "opera"]):
        result = runner.invoke(app, [*EVAL, "--limit", "1", "--split", "random", *other, "--out", str(out)])
        assert result.exit_code == 2 and "holds another run (pope, vanilla)" in result.output
        assert "Give it its own --out" in result.output
    assert "scoring.parser ('pope' there, 'opera' here)" in " ".join(result.output.split())
    assert (out / "results.json").read_bytes() == before
    # the same run again (more samples, another batch size or kernel) is welcome: it resumes
    invoke(*EVAL, "--limit", "2", "--split", "random", "--batch-size", "1", "--out", out)
    assert len(keys(out)) == 2


def test_the_scoring_is_part_of_a_folders_settings(tmp_path):
    """CHAIR's synonym table (by content) is part of the scoring: another table is refused, the same one
    resumes; a folder from before the scoring was recorded is not refused for it, and records it now."""
    table = tmp_path / "synonyms.txt"
    table.write_text("".join(", ".join((name, *words)) + "\n" for name, words in BUILTIN.items()))
    settings = {"model": {"model": "m"}, "methods": {}, "generation": {"max_new_tokens": 4}}
    builtin = {**settings, "scoring": scoring_of({"synonyms": load_table(None).source})}
    from_file = {**settings, "scoring": scoring_of({"synonyms": load_table(table).source})}
    out = tmp_path / "run"
    claim(out, task="chair", run_key="k", label="vanilla", settings=builtin)
    with pytest.raises(
        RunFolderError, match=r"differs in scoring.sha256 .* scoring.synonyms \('built-in' there"
    ):
        claim(out, task="chair", run_key="k", label="vanilla", settings=from_file)
    claim(out, task="chair", run_key="k", label="vanilla", settings=builtin)  # the same scoring resumes
    manifest = out / "run.json"
    manifest.write_text(
        json.dumps({"task": "chair", "label": "vanilla", "run_key": "k", "settings": settings})
    )
    claim(out, task="chair", run_key="k", label="vanilla", settings=from_file)
    assert json.loads(manifest.read_text())["settings"]["scoring"]["synonyms"] == "file"


def test_a_corrupt_cache_line_is_quarantined_and_regenerated(tmp_path, caplog):
    out = tmp_path / "run"
    invoke(*EVAL, "--limit", "3", "--split", "random", "--out", out)
    cache = out / "predictions.jsonl"
    lines = cache.read_text().splitlines()
    lost = json.loads(lines[1])
    cache.write_text(
        "\n".join([lines[0], '{"key": "x", "sample_id": "random/2", "te', lines[2], "[1, 2]", ""])
    )
    with caplog.at_level(logging.WARNING, logger="mitigate"):
        invoke(*EVAL, "--limit", "3", "--split", "random", "--out", out)
    assert "2 corrupt line(s)" in caplog.text and "generated again" in caplog.text
    records = read_jsonl(cache)
    assert sorted(r["sample_id"] for r in records) == ["random/1", "random/2", "random/3"]
    assert next(r for r in records if r["sample_id"] == "random/2") == lost  # regenerated, the same answer
    quarantined = [r for r in read_jsonl(out / "errors.jsonl") if "quarantined" in r]
    assert [q["quarantined"] for q in quarantined] == ["predictions.jsonl:2", "predictions.jsonl:4"]
    assert quarantined[0]["line"].startswith('{"key": "x"') and "not valid JSON" in quarantined[0]["error"]
    results = json.loads((out / "results.json").read_text())
    assert results["n_scored"] == 3 and results["n_errors"] == 0
    # a later resume keeps the quarantined lines on record
    invoke(*EVAL, "--limit", "3", "--split", "random", "--out", out)
    assert len([r for r in read_jsonl(out / "errors.jsonl") if "quarantined" in r]) == 2
