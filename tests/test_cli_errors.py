"""Every command under bad input: a non-zero exit, a message of one or two lines that says what is wrong,
never a traceback (``MITIGATE_DEBUG=1`` shows it), and nothing generated before the method and its
parameters are known to be valid. Offline, on the tiny built-in model."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evals_fixtures import write_lines
from PIL import Image
from transformers import GenerationMixin, GPT2Config
from trihe_fixtures import DATA as TRIHE_DATA
from trihe_fixtures import closed_port_url, write_trihe
from typer.testing import CliRunner

from mitigate import loading
from mitigate.builtin import coco_sample
from mitigate.cli import app
from mitigate.evals.runfolder import RunLock

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["--model", "builtin:tiny-llava"]
DATA = ["--data", "builtin:sample", "--no-progress"]


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path_factory):
    torch.set_num_threads(1)
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path_factory.getbasetemp() / "mitigate-cache"))
    monkeypatch.delenv("MITIGATE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # default run folders land in a temporary place


@pytest.fixture
def no_generation(monkeypatch):
    """Generating anything is a test failure (it would show as an internal error, exit 1)."""

    def generate(*args, **kwargs):
        raise AssertionError("generate() was called before the input was found bad")

    monkeypatch.setattr(GenerationMixin, "generate", generate)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad inputs of every kind, made once."""
    root = tmp_path_factory.mktemp("bad")
    junk = root / "junk.jpg"
    junk.write_bytes(b"junk\n")
    empty = root / "empty.jpg"
    empty.write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    truncated = root / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    gpt2 = root / "gpt2"
    GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=16, architectures=["GPT2LMHeadModel"]
    ).save_pretrained(gpt2)
    no_config = root / "no-config"
    no_config.mkdir()
    corrupt_json = root / "corrupt.jsonl"
    corrupt_json.write_text('{"question_id": 1 "text": "yes"}\n')
    coco = root / "coco"  # annotations but no image files: every sample fails
    shutil.copytree(coco_sample.ensure_sample(tmp_path_factory.mktemp("sample")), coco)
    for image in (coco / "val2014").iterdir():
        image.unlink()
    trihe, trihe_images = write_trihe(root / "trihe")
    answers = write_lines(
        root / "trihe-answers.jsonl",
        [{"image_id": i, "question": q["question"], "text": "A man."} for i, e in TRIHE_DATA.items()
         for q in e["instance"]],
    )  # fmt: skip
    return {
        "trihe": trihe,
        "trihe_images": trihe_images,
        "trihe_answers": answers,
        "closed": closed_port_url(),  # nothing listens there
        "junk": junk,
        "empty": empty,
        "truncated": truncated,
        "gpt2": gpt2,
        "no_config": no_config,
        "corrupt_json": corrupt_json,
        "coco_no_images": coco,
        "folder": root,
    }


def fails(args: list[str], message: str, *, env: dict | None = None, usage: bool = False) -> str:
    """The command fails with ``message``: exit 2, no traceback, a short stderr, no 'internal error'."""
    result = runner.invoke(app, [str(a) for a in args], env=env)
    text = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {text}{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not escaped
    assert "Traceback" not in text and "internal error" not in text
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= (6 if usage else 2), result.stderr  # click's usage errors are a small box
    assert message in " ".join(text.split()), text
    return text


# -- mitigate run and calibrate: files, models, devices, methods and parameters ---------------------
RUN_CASES = [
    (["run", "--image", "{junk}"], "cannot be read"),
    (["run", "--image", "{truncated}"], "truncated"),
    (["run", "--image", "{empty}"], "is empty"),
    (["run", "--image", "{folder}"], "is a folder"),
    (["run", "--image", "/no/such/image.jpg"], "image /no/such/image.jpg not found"),
    (["run", "--image", "builtin:nope"], "unknown built-in image"),
    (["run", "--method", "nope"], "unknown method or preset 'nope'"),
    (["run", "--method", "vra"], "Did you mean vhr, var, vaf?"),
    (["run", "--method", "vanilla"], "give a method to compare"),
    (["run", "--method", "var,var"], "named twice"),
    (["run", "--method", "pai,paint"], "cannot combine"),
    (["run", "--set", "tau=abc"], "var (var): tau: Input should be a valid number"),
    (["run", "--set", "tua=3"], "unknown parameter 'tua'. Did you mean 'tau'?"),
    (["run", "--set", "tau"], "--set expects key=value"),
    (["run", "--set", "layers=[1,"], "the value is not valid YAML"),
    (["run", "--set", "layers=[99]"], "layers [99] out of range"),
    (["run", "--method", "var", "--set", "vhr.alpha=1"], "'vhr' is not among the methods"),
    (["run", "--method", "pai,var", "--set", "layers=[2]"], "several of the methods have 'layers'"),
    (["run", "--method", "pai,var", "--set", "tua=3"], "Did you mean 'tau'?"),
    (["run", "--method", "pai,var", "--set", "var.tau=x"], "tau: Input should be a valid number"),
    (["run", "--kernel", "magic"], "unknown kernel 'magic'"),
    (["run", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["run", "--device-map", "gpu7"], "unknown --device-map 'gpu7'"),
    (["run", "--model", "./nomodel"], "model folder ./nomodel not found"),
    (["run", "--model", "builtin:nope"], "unknown built-in model 'builtin:nope'"),
    (["run", "--model", "{junk}"], "is a file; give the model's folder"),
    (["run", "--model", "{no_config}"], "has no config.json"),
    (["run", "--model", "{gpt2}"], "is a gpt2 model (GPT2LMHeadModel), not a vision-language model"),
    (["run", "--model", "bad id!"], "neither an existing folder nor a valid Hugging Face id"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["calibrate", "--image", "{junk}"], "cannot be read"),
    (["calibrate", "--model", "./nomodel"], "model folder ./nomodel not found"),
    (["calibrate", "--dtype", "int3"], "unknown dtype"),
    (["methods", "--bogus"], "No such option"),
]


@pytest.mark.parametrize(("args", "message"), RUN_CASES, ids=[" ".join(a) for a, _ in RUN_CASES])
def test_run_and_calibrate_bad_input(files, no_generation, args, message):
    args = [a.format(**files) for a in args]
    fails(args, message, usage="--max-new-tokens" in args or "--bogus" in args)


def test_gpt2_folder_names_the_supported_families(files):
    text = fails(["run", "--model", files["gpt2"]], "mitigate supports: llava")
    assert "gemma3" in text and "Aria" not in text  # not transformers' list of a hundred classes


def test_hub_id_offline_fails_at_once(no_generation):
    fails(
        ["run", "--model", "nobody/no-such-vlm"],
        "not in the local cache while HF_HUB_OFFLINE is set",
        env={"HF_HUB_OFFLINE": "1"},
    )


def test_hub_id_without_network_fails_at_once(monkeypatch, no_generation):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    fails(["run", "--model", "nobody/no-such-vlm"], "the Hugging Face hub cannot be reached")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_this_machine_lacks(no_generation):
    fails(["run", "--device-map", "cuda"], "no CUDA GPU is visible")
    fails(["eval", "pope", *TINY, *DATA, "--device-map", "cuda:1"], "no CUDA GPU is visible")


def test_set_targets_one_method_of_a_composition():
    result = runner.invoke(
        app,
        [
            "run",
            "--method",
            "pai,var",
            "--set",
            "var.tau=1.5",
            "--set",
            "alpha=0.25",
            "--max-new-tokens",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "tau=1.5" in result.output and "alpha=0.25" in result.output


def test_help_has_no_stray_types_on_flags():
    for command in (["--help"], ["run", "--help"], ["eval", "pope", "--help"], ["methods", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "<bool>" not in result.output


# -- eval, score, report ----------------------------------------------------------------------------
EVAL_CASES = [
    (["eval", "pope", "--model", "./nomodel", *DATA, "--limit", "2"], "model folder ./nomodel not found"),
    (["eval", "pope", *TINY, *DATA, "--attn-implementation", "magic"], 'attn_implementation="magic"'),
    (["eval", "pope", *TINY, *DATA, "--method", "var", "--set", "tau=abc"], "tau: Input should be a valid"),
    (["eval", "pope", *TINY, *DATA, "--method", "var", "--set", "tua=1"], "Did you mean 'tau'?"),
    (["eval", "pope", *TINY, *DATA, "--method", "var", "--set", "layers=[99]"], "out of range"),
    (["eval", "pope", *TINY, *DATA, "--method", "vanilla", "--set", "tau=1"], "--set needs a method"),
    (["eval", "pope", *TINY, *DATA, "--dtype", "float8"], "unknown dtype"),
    (["eval", "pope", *TINY, *DATA, "--out", "{junk}"], "is a file"),
    (["eval", "pope", *TINY, "--data", "builtin:nope"], "unknown --data 'builtin:nope'"),
    (["eval", "pope", *TINY, "--questions", "/no/such/q.json", *DATA], "/no/such/q.json"),
    (["eval", "pope", *TINY, "--questions", "{corrupt_json}", *DATA], "not valid JSON"),
    (["eval", "pope", *TINY, *DATA, "--limit", "0"], "--limit"),
    (["eval", "chair", *TINY, *DATA, "--image-ids", "{corrupt_json}"], "not valid JSON"),
    (["eval", "chair", *TINY, *DATA, "--synonyms", "/no/such.txt"], "/no/such.txt"),
    (["score", "pope", "--questions", "/no/q.json", "--answers", "/no/a.jsonl"], "/no/q.json"),
    (["score", "chair", "--captions", "{corrupt_json}", *DATA[:2]], "not valid JSON"),
    (["score", "chair", "--captions", "{empty}", *DATA[:2]], "no scored samples"),
    (["report", "/no/such/run"], "not a finished run folder"),
    (["report", "{folder}"], "not a finished run folder"),
    (["eval", "nope"], "No such command"),
]


@pytest.mark.parametrize(("args", "message"), EVAL_CASES, ids=[" ".join(a[:4]) for a, _ in EVAL_CASES])
def test_eval_score_report_bad_input(files, no_generation, args, message):
    args = [a.format(**files) for a in args]
    fails(args, message, usage=any(a in args for a in ("--limit", "nope")))


# -- serve, compare, Tri-HE, families -----------------------------------------------------------------
TRIHE = ["--data", "{trihe}", "--image-root", "{trihe_images}", "--no-progress"]
ANSWERS = ["--data", "{trihe}", "--answers", "{trihe_answers}", "--no-progress"]
MORE_CASES = [
    (
        ["serve", *TINY, "--method", "var", "--set", "tau=abc"],
        "var (var): tau: Input should be a valid number",
    ),
    (["serve", *TINY, "--method", "vra"], "Did you mean vhr, var, vaf?"),
    (["serve", *TINY, "--set", "tua=1"], "unknown parameter 'tua'. Did you mean 'tau'?"),
    (["serve", *TINY, "--set", "layers=[99]"], "layers [99] out of range"),
    (["serve", *TINY, "--method", "none", "--set", "tau=1"], "--set needs a method"),
    (["serve", "--model", "./nomodel"], "model folder ./nomodel not found"),
    (["serve", "--model", "{gpt2}"], "not a vision-language model"),
    (["serve", *TINY, "--dtype", "float8"], "unknown dtype 'float8'"),
    (["serve", *TINY, "--allow-local-files", "/no/such/folder"], "'/no/such/folder' is not a folder"),
    (["serve", *TINY, "--port", "70000"], "--port"),
    (
        ["compare", *TINY, "--methods", "vra,vaf", "--benchmarks", "pope", *DATA, "--limit", "1"],
        "unknown method or preset 'vra'. Did you mean vhr, var, vaf?",
    ),
    (["compare", *TINY, "--methods", "none", "--benchmarks", "pope", *DATA], "names no method"),
    (["compare", *TINY, "--benchmarks", "pope,mmlu", *DATA], "--benchmarks 'pope,mmlu': choose from"),
    (["compare", *TINY, "--benchmarks", "trihe"], "needs --trihe-data"),
    (
        [
            "compare",
            *TINY,
            "--methods",
            "vaf",
            "--benchmarks",
            "pope,trihe",  # POPE's vanilla run must not go first either
            *DATA,
            "--trihe-data",
            "{trihe}",
            "--image-root",
            "{trihe_images}",
            "--judge-url",
            "{closed}",
            "--judge-model",
            "m",
        ],
        "cannot be reached",
    ),
    (["eval", "trihe", *TINY, *TRIHE, "--judge-model", "m", "--judge-url", "{closed}"], "cannot be reached"),
    (
        ["eval", "trihe", *TINY, *TRIHE, "--judge-model", "m", "--judge-url", "localhost:8000/v1"],
        "--judge-url 'localhost:8000/v1' is not an http:// or https:// URL",
    ),
    (["eval", "trihe", *TINY, *TRIHE], "--judge-model is needed"),
    (["eval", "trihe", *TINY, *TRIHE, "--judge-model", "m", "--judge", "gpt"], "--judge 'gpt': give 'llm'"),
    (["eval", "trihe", *TINY, *TRIHE, "--judge-model", "m", "--method", "vra"], "Did you mean"),
    (
        [
            "eval",
            "trihe",
            *TINY,
            "--data",
            "/no/tri-he.json",
            "--image-root",
            "{trihe_images}",
            "--judge-model",
            "m",
        ],
        "--data /no/tri-he.json: no such file",
    ),
    (
        [
            "eval",
            "trihe",
            *TINY,
            "--data",
            "{corrupt_json}",
            "--image-root",
            "{trihe_images}",
            "--judge-model",
            "m",
        ],
        "not valid JSON",
    ),
    (["score", "trihe", *ANSWERS], "--judge-model is needed"),
    (["score", "trihe", *ANSWERS, "--judge-model", "m", "--judge-url", "{closed}"], "cannot be reached"),
    (["score", "trihe", *ANSWERS, "--judge-model", "m", "--judge-url", "http://"], "is not an http://"),
    (
        ["score", "trihe", "--data", "{trihe}", "--answers", "/no/a.jsonl", "--judge-model", "m"],
        "/no/a.jsonl",
    ),
    (
        ["score", "trihe", "--data", "{trihe}", "--answers", "{corrupt_json}", "--judge-model", "m"],
        "corrupt.jsonl:1",
    ),
    (["families", "--bogus"], "No such option"),
    (["families", "llava"], "unexpected extra argument"),
]


@pytest.fixture
def no_serving(monkeypatch):
    """Binding the port is a test failure: every setup error must come before it."""
    from mitigate.serve import server

    def run(*args, **kwargs):
        raise AssertionError("the server was started before the input was found bad")

    monkeypatch.setattr(server, "run", run)


@pytest.mark.parametrize(("args", "message"), MORE_CASES, ids=[" ".join(a[:4]) for a, _ in MORE_CASES])
def test_serve_compare_trihe_families_bad_input(files, no_generation, no_serving, args, message):
    args = [a.format(**files) for a in args]
    fails(args, message, usage=any(a in args for a in ("--port", "--bogus", "llava")))


def test_serve_binds_only_once_its_setup_is_good(monkeypatch, no_generation):
    """The check above is not vacuous: a good setup reaches the (patched) server start, with its address."""
    from mitigate.serve import server

    started = []
    monkeypatch.setattr(server, "run", lambda app, **kw: started.append(kw))
    result = runner.invoke(app, ["serve", *TINY, "--method", "var", "--set", "tau=2", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert started == [{"host": "127.0.0.1", "port": 8123, "log_level": "info"}]


@pytest.mark.parametrize("task", ["pope", "chair"])
def test_a_run_where_every_sample_fails(files, tmp_path, task):
    out = tmp_path / "run"
    text = fails(
        ["eval", task, *TINY, "--coco-root", files["coco_no_images"], "--no-progress", "--limit", "2",
         "--max-new-tokens", "2", "--out", out],
        "no sample could be scored",
    )  # fmt: skip
    assert "not found" in text and "errors.jsonl" in text
    results = json.loads((out / "results.json").read_text())
    assert results["n_scored"] == 0 and results["n_errors"] == results["n_samples"] > 0
    assert "No sample could be scored" in (out / "results.md").read_text()


def test_attn_implementation_is_applied_to_builtin_models(tmp_path):
    out = tmp_path / "eager"
    result = runner.invoke(
        app, ["eval", "pope", *TINY, *DATA, "--limit", "1", "--split", "random",
              "--attn-implementation", "eager", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model, _ = loading.load_model("builtin:tiny-llava", attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "eager"


def test_a_busy_run_folder_names_its_holder(tmp_path, no_generation):
    out = tmp_path / "run"
    with RunLock(out):
        fails(["eval", "pope", *TINY, *DATA, "--out", out], f"is in use by pid {os.getpid()} on host")


def test_report_refuses_runs_with_nothing_in_common(tmp_path):
    runs = []
    for split, method in (("random", "vanilla"), ("popular", "vaf")):
        out = tmp_path / split
        result = runner.invoke(
            app, ["eval", "pope", *TINY, *DATA, "--limit", "2", "--split", split, "--method", method,
                  "--max-new-tokens", "2", "--out", str(out)],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs.append(out)
    fails(["report", *runs, "--out", tmp_path / "report"], "the runs have no scored sample in common")
    assert not (tmp_path / "report").exists()


def test_score_a_corrupt_answer_file_names_the_line(tmp_path, files):
    questions = write_lines(
        tmp_path / "coco_pope_random.json",
        [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}],
    )
    fails(["score", "pope", "--questions", questions, "--answers", files["corrupt_json"]], "corrupt.jsonl:1")


# -- the error path itself --------------------------------------------------------------------------
def test_mitigate_debug_shows_the_error_itself(files):
    result = runner.invoke(app, ["run", "--image", str(files["junk"])], env={"MITIGATE_DEBUG": "1"})
    assert result.exit_code == 1 and type(result.exception).__name__ == "ImageError"


def test_an_unexpected_error_says_it_is_a_bug(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something no input explains")

    monkeypatch.setattr(loading, "load_model", broken)
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "internal error (a bug in mitigate): RuntimeError: something no input explains" in result.output
    assert "MITIGATE_DEBUG=1" in result.output and len(result.stderr.strip().splitlines()) == 2


def test_the_installed_command_prints_no_traceback(files):
    """Through a real process, with the console script's own exception hooks."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MITIGATE_DEBUG", None)
    command = [sys.executable, "-m", "mitigate.cli", "run", "--image", str(files["junk"])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    junk = files["junk"]
    assert done.stderr.strip() == f"Error: image {junk} cannot be read: cannot identify image file '{junk}'"
