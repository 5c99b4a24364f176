"""``mitigate serve`` end to end: a subprocess on a loopback port, spoken to with the official openai client.

The reference is the library itself: ``model.generate`` on the same prompt under ``mitigated(model, spec)``,
with the same built-in model (built deterministically from a seed, so the server's copy is identical).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from serving import free_port, get, library_answer, post_raw, running, user_message

from mitigate.builtin import sample_image, shapes_image
from mitigate.loading import load_model
from mitigate.serve.specs import parse

openai = pytest.importorskip("openai")

MODEL = "builtin:tiny-llava"
TOKENS = 6
LIMIT = 64  # --max-tokens-limit
PAI = {"method": "pai", "params": {"alpha": 1.0}}


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    allowed.mkdir()
    sample_image().save(allowed / "sample.png")
    sample_image().save(root / "outside.png")
    (allowed / "escape.png").symlink_to(root / "outside.png")
    return allowed


@pytest.fixture(scope="module")
def server(tmp_path_factory, local_dir):
    port = free_port()
    args = [
        "-m",
        "mitigate.cli",
        "serve",
        "--model",
        MODEL,
        "--port",
        str(port),
        "--method",
        "var",
        "--max-batch",
        "8",
        "--batch-wait-ms",
        "300",
        "--max-tokens-limit",
        str(LIMIT),
        "--max-images",
        "2",
        "--max-image-bytes",
        "60000",
        "--max-image-pixels",
        "250000",
        "--allow-local-files",
        str(local_dir),
    ]
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running(args, f"http://127.0.0.1:{port}/health", log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference():
    return load_model(MODEL)


def ask(client, prompt, image, *, mitigation=..., max_tokens=TOKENS, stream=False, **extra):
    body = {} if mitigation is ... else {"mitigation": mitigation}
    kwargs = {
        "model": MODEL,
        "messages": user_message(prompt, image),
        "max_tokens": max_tokens,
        "extra_body": body,
        **extra,
    }
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_answers_equal_the_library(client, reference):
    model, processor = reference
    prompt, image = "Is there a red circle in the image?", sample_image()
    vanilla = library_answer(model, processor, prompt, image, None, TOKENS)
    pai = library_answer(model, processor, prompt, image, {"pai": {"alpha": 1.0}}, TOKENS)
    var = library_answer(model, processor, prompt, image, "var", TOKENS)
    assert pai != vanilla  # the mitigation changes this answer, so a server that ignored it would fail
    assert ask(client, prompt, image) == var  # no field: the server's default (--method var)
    assert ask(client, prompt, image, stream=True) == var
    assert ask(client, prompt, image, mitigation=PAI) == pai
    assert ask(client, prompt, image, mitigation=PAI, stream=True) == pai
    assert ask(client, prompt, image, mitigation=None) == vanilla
    assert ask(client, prompt, image, mitigation=None, stream=True) == vanilla
    # a stop string ends the answer before it, streamed or not
    assert "clock" in pai
    cut = pai[: pai.index("clock")]
    assert ask(client, prompt, image, mitigation=PAI, stop=["clock"]) == cut
    assert ask(client, prompt, image, mitigation=PAI, stop="clock", stream=True) == cut


def test_usage_and_echo(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=user_message("Describe this image in detail.", sample_image()),
        max_tokens=TOKENS,
        extra_body={"mitigation": PAI},
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + TOKENS
    assert response.model_extra["mitigation"] == {"pai": {"alpha": 1.0}}


def test_concurrent_requests_equal_alone(client, server):
    """16 requests in flight at once over 3 mitigations (two of them the same method with other
    parameters), prompts of several lengths, some without an image, several max_tokens."""
    mitigations = [PAI, "vaf", {"pai": {"alpha": 3.0}}]
    prompts = [
        "Is there a red circle in the image?",
        "Describe this image in detail.",
        "What color is the square on the left of the picture?",
        "How many objects are there?",
    ]
    images: list[Image.Image | None] = [shapes_image(seed=s, count=2)[0] for s in range(3)] + [None]
    jobs = [(prompts[i % 4], images[(i // 2) % 4], mitigations[i % 3], 4 + i % 3) for i in range(16)]
    before = get(f"{server}/health")[1]["batches"]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(
            pool.map(
                lambda j: ask(client, j[0], j[1], mitigation=j[2], max_tokens=j[3], stream=bool(j[3] % 2)),
                jobs,
            )
        )
    batches = get(f"{server}/health")[1]["batches"] - before
    alone = [ask(client, p, img, mitigation=m, max_tokens=n) for p, img, m, n in jobs]
    assert together == alone
    assert batches < len(jobs)  # requests did share batches
    # the three mitigations answer differently, so a batch that mixed them would show
    by_spec = {json.dumps(m): ask(client, prompts[0], images[0], mitigation=m) for m in mitigations}
    assert len(set(by_spec.values())) == 3


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.code


@pytest.mark.parametrize(
    ("mitigation", "code"),
    [
        ("no-such-method", "unknown_method"),
        ({"method": "pai", "params": {"no_such_param": 1}}, "invalid_mitigation"),
        ({"method": "pai", "params": {"alpha": "high"}}, "invalid_mitigation"),
        (["pai", "paint"], "invalid_mitigation"),
        (42, "invalid_mitigation"),
    ],
)
def test_bad_mitigation(client, server, mitigation, code):
    for stream in (False, True):
        status, got = _error(
            lambda s=stream: ask(client, "Is there a cat?", sample_image(), mitigation=mitigation, stream=s)
        )
        assert (status, got) == (400, code)
    assert get(f"{server}/health")[0] == 200


def _image_of_bytes(n: int) -> Image.Image:
    """An image whose PNG is over ``n`` bytes (noise does not compress)."""
    import random

    rng = random.Random(0)
    side = int((n / 3) ** 0.5) + 8
    return Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))


def _content(client, parts, **extra):
    extra.setdefault("max_tokens", TOKENS)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], **extra)


def test_bad_requests(client, server, local_dir):
    url = user_message("x", sample_image())[0]["content"][0]
    text = {"type": "text", "text": "What is in the image?"}
    cases = {
        "too many images": (lambda: _content(client, [url, url, url, text]), (400, "too_many_images")),
        "image too large (bytes)": (
            lambda: _content(client, [user_message("x", _image_of_bytes(70000))[0]["content"][0], text]),
            (413, "image_too_large"),
        ),
        "image too large (pixels)": (
            lambda: _content(
                client, [user_message("x", Image.new("RGB", (600, 600)))[0]["content"][0], text]
            ),
            (413, "image_too_large"),
        ),
        "context": (
            lambda: _content(client, [url, {"type": "text", "text": "cat " * 480}], max_tokens=LIMIT),
            (400, "context_length_exceeded"),
        ),
        "max_tokens over the limit": (
            lambda: _content(client, [url, text], max_tokens=LIMIT + 1),
            (400, "max_tokens_exceeded"),
        ),
        "content type": (
            lambda: _content(
                client, [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, text]
            ),
            (400, "unsupported_content_type"),
        ),
        "remote url": (
            lambda: _content(
                client, [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}, text]
            ),
            (400, "remote_url_refused"),
        ),
        "path outside the folder": (
            lambda: _content(client, [{"type": "image_url", "image_url": {"url": "../outside.png"}}, text]),
            (403, "path_not_allowed"),
        ),
        "symlink out of the folder": (
            lambda: _content(client, [{"type": "image_url", "image_url": {"url": "escape.png"}}, text]),
            (403, "path_not_allowed"),
        ),
        "not an image": (
            lambda: _content(
                client, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, text]
            ),
            (400, "invalid_image"),
        ),
        "unknown model": (
            lambda: client.chat.completions.create(model="other", messages=user_message("x", None)),
            (404, "model_not_found"),
        ),
        "n > 1": (lambda: _content(client, [text], n=2), (400, "unsupported_parameter")),
        "tools": (
            lambda: _content(client, [text], tools=[{"type": "function", "function": {"name": "f"}}]),
            (400, "unsupported_parameter"),
        ),
    }
    for name, (call, expected) in cases.items():
        assert _error(call) == expected, name
        assert get(f"{server}/health")[0] == 200, name
    # malformed JSON and a body that is not an object (the openai client always sends valid JSON)
    status, body = post_raw(f"{server}/v1/chat/completions", b'{"model": "builtin:tiny-llava", "messages": [')
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = post_raw(f"{server}/v1/chat/completions", b"[1, 2]")
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    status, body = post_raw(f"{server}/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert (status, body["error"]["param"]) == (400, "messages")
    status, health = get(f"{server}/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL


def test_local_files_under_the_folder(client, reference, local_dir):
    model, processor = reference
    part = {"type": "image_url", "image_url": {"url": str(local_dir / "sample.png")}}
    answer = (
        _content(
            client,
            [part, {"type": "text", "text": "Is there a red circle in the image?"}],
            extra_body={"mitigation": None},
        )
        .choices[0]
        .message.content
    )
    relative = {"type": "image_url", "image_url": {"url": "sample.png"}}
    again = (
        _content(
            client,
            [relative, {"type": "text", "text": "Is there a red circle in the image?"}],
            extra_body={"mitigation": None},
        )
        .choices[0]
        .message.content
    )
    expected = library_answer(
        model, processor, "Is there a red circle in the image?", sample_image(), None, TOKENS
    )
    assert answer == again == expected


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, health = get(f"{server}/health")
    assert status == 200 and health["model"] == MODEL and health["default_mitigation"] == {"var": {}}
    assert get(f"{server}/no/such/route")[0] == 404


def test_spec_forms_share_a_key():
    assert parse("pai").key == parse(["pai"]).key == parse({"pai": {}}).key == parse({"method": "pai"}).key
    assert parse({"method": "pai", "params": {"alpha": 1}}).key == parse({"pai": {"alpha": 1}}).key
    assert parse(["pai", "vhr"]).key != parse(["vhr", "pai"]).key  # composition order matters
    assert parse({"pai": {"alpha": 1}}).key != parse({"pai": {"alpha": 2}}).key
    assert parse(None).vanilla and parse("none").vanilla
    assert parse({"var": {"sink_dims": [1, 2]}}).as_apply_arg() == {"var": {"sink_dims": [1, 2]}}
