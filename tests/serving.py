"""Test kit for the servers: start one on a free loopback port in a subprocess, reference answers from the
library, images as data URLs. Every request goes to 127.0.0.1 only."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mitigate import mitigated
from mitigate.loading import chat_prompt


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def post_raw(url: str, body: bytes, timeout: float = 60) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@contextlib.contextmanager
def running(args: list[str], health: str, log: Path, timeout: float = 240) -> Iterator[subprocess.Popen]:
    """Run ``python args...`` until ``health`` answers 200; stop it afterwards."""
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                if get(health, timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(prompt: str, image: Image.Image | None) -> list[dict[str, Any]]:
    """One user turn: the image first, then the text (as ``mitigate.loading.chat_prompt`` lays it out)."""
    parts: list[dict[str, Any]] = []
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


@torch.inference_mode()
def library_answer(
    model, processor, prompt: str, image: Image.Image | None, spec: Any, max_tokens: int
) -> str:
    """The library's greedy ``generate`` for one prompt under ``spec`` (``None``: no mitigation)."""
    text = chat_prompt(processor, prompt, with_image=image is not None)
    inputs = processor(images=[[image]] if image is not None else None, text=[text], return_tensors="pt")
    scope = mitigated(model, spec, processor=processor) if spec is not None else contextlib.nullcontext()
    with scope:
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
