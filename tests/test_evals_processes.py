"""Runs in real processes: a run killed with SIGKILL resumes with nothing lost or duplicated, and
``accelerate launch`` with two processes on the CPU gives the numbers of one process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mitigate.evals.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
# 30 questions per split, one per batch: long enough to be killed midway, short enough for CI.
ARGS = ["eval", "pope", "--model", "builtin:tiny-llava", "--data", "builtin:sample", "--limit", "30",
        "--batch-size", "1", "--max-new-tokens", "8", "--no-progress"]  # fmt: skip
TOTAL = 90


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    env["MITIGATE_CACHE"] = str(tmp_path_factory.getbasetemp() / "mitigate-cache")
    env["OMP_NUM_THREADS"] = "1"  # the in-process reference run below uses one thread too
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(
        [sys.executable, "-m", "mitigate.evals", *ARGS, "--out", str(out)],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(out: Path) -> dict[str, str]:
    predictions = read_jsonl(out / "predictions.jsonl")
    ids = [p["sample_id"] for p in predictions]
    assert len(ids) == len(set(ids)) == TOTAL, "every sample exactly once"
    return {p["sample_id"]: p["text"] for p in predictions}


def _metrics(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["metrics"]


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(env, reference, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    predictions = out / "predictions.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "mitigate.evals", *ARGS, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if predictions.is_file() and predictions.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = predictions.read_bytes().count(b"\n")
    assert 5 <= done < TOTAL and not (out / "results.json").exists()

    subprocess.run(
        [sys.executable, "-m", "mitigate.evals", *ARGS, "--out", str(out)],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert _answers(out) == _answers(reference)
    assert _metrics(out) == _metrics(reference)
    assert len(read_jsonl(out / "samples.jsonl")) == TOTAL


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="accelerate's launcher is not installed",
)
def test_accelerate_launch_two_processes_matches_one(env, reference, tmp_path):
    out = tmp_path / "sharded"
    launcher = str(Path(sys.executable).parent / "accelerate")
    # Without GPUs, accelerate starts several processes only with --multi_gpu (its torchrun launcher).
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "mitigate.evals", *ARGS, "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    assert not list(out.glob("predictions.rank*.jsonl"))  # merged into predictions.jsonl
    assert _answers(out) == _answers(reference)
    assert _metrics(out) == _metrics(reference)
