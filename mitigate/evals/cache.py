"""The prediction cache of a run folder: JSON lines keyed by sample, model, method, prompt and settings.

``predictions.jsonl`` holds one line per generated answer::

    {"key": "<sha256>", "run": "<run key>", "sample_id": "random/12", "text": "Yes"}

A sharded run appends to ``predictions.rank<r>.jsonl`` (one file per process, so no two processes write
one file); the main process merges them into ``predictions.jsonl`` at the end. Readers take the union of
all these files, first occurrence wins, so a run killed at any point (even mid-merge) resumes with nothing
lost or duplicated.

A corrupt line (not JSON, or not an answer record) never blocks a run: readers skip it, and the process
that writes its file moves it to ``errors.jsonl`` (``{"quarantined": "predictions.jsonl:7", ...}``) with a
warning, so that its answer is generated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .jsonl import append_jsonl, repair_tail, scan_lines
from .parallel import Shard

log = logging.getLogger("mitigate")

MAIN = "predictions.jsonl"
ERRORS = "errors.jsonl"


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def record_key(run_key: str, sample_id: str, prompt: str) -> str:
    """The cache key of one answer: the run key (model, method parameters, generation settings), the
    sample and the exact prompt text the model sees (after its chat template)."""
    return digest({"run": run_key, "sample": sample_id, "prompt": prompt})


class PredictionCache:
    def __init__(self, folder: Path, shard: Shard | None = None):
        shard = shard or Shard()
        self.folder = Path(folder)
        self.main = self.folder / MAIN
        self.shard = shard
        self.own = self.main if shard.world == 1 else self.folder / f"predictions.rank{shard.rank}.jsonl"
        self.corrupt: dict[Path, list[tuple[int, str, str]]] = {}  # file -> (line, text, what is wrong)

    def shard_files(self) -> list[Path]:
        return sorted(self.folder.glob("predictions.rank*.jsonl"))

    def _read(self, path: Path) -> list[dict[str, Any]]:
        """The answer records of one file; its bad lines are noted in ``self.corrupt``."""
        good, bad = scan_lines(path, skip_partial_tail=True)
        records = []
        for number, record in good:
            if isinstance(record.get("key"), str) and isinstance(record.get("text"), str):
                records.append(record)
            else:
                bad.append((number, json.dumps(record)[:2000], "not an answer record (no key or text)"))
        if bad:
            self.corrupt[path] = sorted(bad)
        else:
            self.corrupt.pop(path, None)
        return records

    def load(self) -> dict[str, dict[str, Any]]:
        """Every finished answer by key, from the main file and any shard files (corrupt lines skipped)."""
        out: dict[str, dict[str, Any]] = {}
        for path in [self.main, *self.shard_files()]:
            if path.is_file():
                for record in self._read(path):
                    out.setdefault(record["key"], record)
        return out

    def prepare(self) -> None:
        """Before appending: drop a line a killed writer left unfinished in our own file, and quarantine
        the corrupt lines of the files this process writes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        owned = [self.own] if self.own == self.main or not self.shard.main else [self.own, self.main]
        for path in owned:
            repair_tail(path)
            if path.is_file():
                self._read(path)
                self.quarantine(path)

    def quarantine(self, path: Path, *, rewrite: bool = True) -> int:
        """Move the corrupt lines found in ``path`` to ``errors.jsonl``; returns how many there were."""
        bad = self.corrupt.pop(path, [])
        if not bad:
            return 0
        if rewrite:
            numbers = {number for number, _, _ in bad}
            lines = path.read_bytes().split(b"\n")
            kept = b"\n".join(line for i, line in enumerate(lines, start=1) if i not in numbers)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(kept)
            os.replace(tmp, path)
        append_jsonl(
            self.folder / ERRORS,
            [{"quarantined": f"{path.name}:{n}", "error": why, "line": text} for n, text, why in bad],
        )
        number, _, why = bad[0]
        log.warning(
            "mitigate: %s: %d corrupt line(s) (the first, line %d: %s) moved to %s; their answers will be "
            "generated again",
            path,
            len(bad),
            number,
            why,
            self.folder / ERRORS,
        )
        return len(bad)

    def append(self, records: list[dict[str, Any]]) -> None:
        append_jsonl(self.own, records)

    def merge(self) -> None:
        """Main process, after every shard is done: move shard answers into ``predictions.jsonl``."""
        shards = self.shard_files()
        if not shards:
            return
        repair_tail(self.main)
        have = set()
        if self.main.is_file():
            have = {r["key"] for r in self._read(self.main)}
            self.quarantine(self.main)
        new = []
        for path in shards:
            for record in self._read(path):
                if record["key"] not in have:
                    have.add(record["key"])
                    new.append(record)
            self.quarantine(path, rewrite=False)  # the file goes once merged
        append_jsonl(self.main, new)
        for path in shards:  # only once their lines are safely in the main file
            path.unlink()
