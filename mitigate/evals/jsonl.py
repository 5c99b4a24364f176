"""JSON lines: reading with ``file:line`` in every error, and appending that survives a killed process.

A record counts only once its line is terminated: a process killed in the middle of a write leaves at
most one unterminated tail, which readers skip and :func:`repair_tail` removes before the next append.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A malformed line or record; the message starts with ``file:line``."""


def iter_lines(path: Path, *, skip_partial_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line; CRLF endings are accepted (official POPE files)."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    last = len(lines)
    if skip_partial_tail and lines and lines[-1].strip():  # unterminated: an interrupted append
        last -= 1
    for number, raw in enumerate(lines[:last], start=1):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise JsonlError(f"{path}:{number}: not valid JSON ({error.msg}): {text[:80]!r}") from None
        if not isinstance(record, dict):
            raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def scan_lines(
    path: Path, *, skip_partial_tail: bool = False
) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str, str]]]:
    """Like :func:`iter_lines`, but a bad line does not stop the reading: returns ``(good, bad)``, with
    ``(line number, record)`` per good line and ``(line number, text, what is wrong)`` per bad one."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    last = len(lines)
    if skip_partial_tail and lines and lines[-1].strip():
        last -= 1
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[tuple[int, str, str]] = []
    for number, raw in enumerate(lines[:last], start=1):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            bad.append((number, text, f"not valid JSON ({error.msg})"))
            continue
        if isinstance(record, dict):
            good.append((number, record))
        else:
            bad.append((number, text, f"expected a JSON object, got {type(record).__name__}"))
    return good, bad


def read_jsonl(path: Path, *, required: tuple[str, ...] = (), skip_partial_tail: bool = False) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    for number, record in iter_lines(path, skip_partial_tail=skip_partial_tail):
        missing = [k for k in required if k not in record]
        if missing:
            raise JsonlError(
                f"{path}:{number}: missing key(s) {', '.join(missing)} (has {', '.join(record)})"
            )
        out.append(record)
    return out


def read_records(path: Path, *, required: tuple[str, ...] = ()) -> list[dict]:
    """JSON lines, or one JSON list of objects (as some released caption files are)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    head = path.read_text(encoding="utf-8", errors="replace").lstrip()[:1]
    if head != "[":
        return read_jsonl(path, required=required)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise JsonlError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise JsonlError(f"{path}: item {index}: expected a JSON object")
        missing = [k for k in required if k not in record]
        if missing:
            raise JsonlError(f"{path}: item {index}: missing key(s) {', '.join(missing)}")
    return data


def repair_tail(path: Path) -> int:
    """Cut an unterminated last line (left by a killed writer); returns the bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        # Find the last newline, reading backwards in blocks.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            block = handle.read(end - start)
            index = block.rfind(b"\n")
            if index >= 0:
                keep = start + index + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        return size - keep


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records with one write, then flush and fsync, so a kill loses at most the unwritten lines."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not payload:
        return
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with these records."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
