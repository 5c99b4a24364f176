"""A small Tri-HE dataset in the released ``tri-he.json`` format (written here, not copied), and a fake
OpenAI-compatible chat server on 127.0.0.1 for the judge tests."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

# image id -> entry, as the released file has it: questions with their reference answer and triplets,
# the image's reference triplets (GQA scene-graph strings) and its object lists.
DATA: dict[str, dict[str, Any]] = {
    "1001": {
        "instance": [
            {"question": "What is the man holding?", "answer": "A pen.", "triplet": ["(man, holding, pen)"]},
            {"question": "What color is the laptop?", "answer": "Black.", "triplet": ["(laptop, is, black)"]},
            {"question": "What is the desk made of?", "answer": "Wood.", "triplet": ["(desk, is, wooden)"]},
        ],
        "triplets": [
            "(laptop, is, black)",
            "(man, holding, pen)",
            "(desk, is, wooden)",
            "(desk, sitting at, man)",
        ],
        "all_object": ["laptop", "pen", "man", "desk", "man"],
        "object": ["laptop", "pen", "man", "desk"],
    },
    "1002": {
        "instance": [
            {
                "question": "What is the woman doing?",
                "answer": "Riding.",
                "triplet": ["(woman, riding, horse)"],
            },
            {"question": "Where might they go?", "answer": "Home.", "triplet": ["(woman, on, beach)"]},
            {"question": "Is there an animal?", "answer": "A horse.", "triplet": ["(horse, on, sand)"]},
        ],
        "triplets": ["(woman, riding, horse)", "(woman, on, beach)", "(horse, on, sand)", "(hat, is, red)"],
        "all_object": ["woman", "horse", "beach", "sand", "hat"],
        "object": ["woman", "horse", "beach", "sand"],
    },
    "1003": {
        "instance": [
            {"question": "What is in the sky?", "answer": "Clouds.", "triplet": ["(clouds, in, sky)"]},
            {"question": "What color is the sky?", "answer": "Gray.", "triplet": ["(sky, is, gray)"]},
            {"question": "What is happening?", "answer": "Rain.", "triplet": ["(rain, falling, street)"]},
        ],
        "triplets": ["(clouds, in, sky)", "(sky, is, gray)", "(rain, falling, street)"],
        "all_object": ["clouds", "sky", "street", "rain"],
        "object": ["clouds", "sky", "street"],
    },
}


def write_trihe(root: Path, images: bool = True) -> tuple[Path, Path]:
    """``(tri-he.json, image folder)`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "tri-he.json"
    data.write_text(json.dumps(DATA, indent=1))
    folder = root / "usage_figures"
    folder.mkdir(exist_ok=True)
    if images:
        for n, image_id in enumerate(DATA):
            Image.new("RGB", (40, 30), (40 * n + 30, 120, 200 - 50 * n)).save(folder / f"{image_id}.jpg")
    return data, folder


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "fake",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


YES = '{"verdict": "yes", "error": null}'

# A reply: (status, body) or (status, body, headers); body is a completion's text (status 200) or raw text.
Reply = tuple[int, str] | tuple[int, str, dict[str, str]]


class FakeOpenAI:
    """``POST /v1/chat/completions`` on 127.0.0.1 (a free port), answered by ``script(body) -> Reply``;
    counts the requests, and answers 401 when the bearer key is not ``key`` (when one is set)."""

    def __init__(self, script: Callable[[dict[str, Any]], Reply], key: str | None = None):
        self.script = script
        self.key = key
        self.requests: list[dict[str, Any]] = []
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    reply: Reply = (404, "no such route")
                elif fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    reply = (401, "bad key")
                else:
                    with fake._lock:
                        reply = fake.script(body)
                status, text, headers = (*reply, {}) if len(reply) == 2 else reply
                with fake._lock:
                    fake.requests.append(body)
                    fake.statuses[status] += 1
                payload = json.dumps(completion(text)) if status == 200 else text
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def request_kind(body: dict[str, Any]) -> tuple[str, str, bool]:
    """``(kind, payload, is_retry)``: "extract" with the answer text, or "judge" with the claim's JSON."""
    user = body["messages"][1]["content"]
    retry = len(body["messages"]) > 2
    if user.startswith("Answer:\n"):
        return "extract", user.removeprefix("Answer:\n"), retry
    return "judge", user.rsplit("Claim:\n", 1)[1], retry


def generic():
    """Every answer claims the same two things; the first is supported, the second a relation error."""

    def script(body):
        kind, payload, _ = request_kind(body)
        if kind == "extract":
            return 200, '[["image", "shows", "scene"], ["thing", "near", "other"]]'
        supported = json.loads(payload)[0] == "image"
        return 200, YES if supported else '{"verdict": "no", "error": "relation"}'

    return script


def closed_port_url() -> str:
    """The base URL of a port on 127.0.0.1 where nothing listens (bound, then closed): connections are
    refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
