"""The prediction cache of a run folder: JSON lines keyed by sample, model, method, prompt and settings.

``predictions.jsonl`` holds one line per generated answer::

    {"key": "<sha256>", "run": "<run key>", "sample_id": "random/12", "text": "Yes"}

A sharded run appends to ``predictions.rank<r>.jsonl`` (one file per process, so no two processes write
one file); the main process merges them into ``predictions.jsonl`` at the end. Readers take the union of
all these files, first occurrence wins, so a run killed at any point (even mid-merge) resumes with nothing
lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .jsonl import append_jsonl, iter_lines, repair_tail
from .parallel import Shard

MAIN = "predictions.jsonl"


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

    def shard_files(self) -> list[Path]:
        return sorted(self.folder.glob("predictions.rank*.jsonl"))

    def load(self) -> dict[str, dict[str, Any]]:
        """Every finished answer by key, from the main file and any shard files."""
        out: dict[str, dict[str, Any]] = {}
        for path in [self.main, *self.shard_files()]:
            if path.is_file():
                for _, record in iter_lines(path, skip_partial_tail=True):
                    out.setdefault(record["key"], record)
        return out

    def prepare(self) -> None:
        """Before appending: drop a line a killed writer left unfinished in our own file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        repair_tail(self.own)

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
            have = {r["key"] for _, r in iter_lines(self.main, skip_partial_tail=True)}
        new = []
        for path in shards:
            for _, record in iter_lines(path, skip_partial_tail=True):
                if record["key"] not in have:
                    have.add(record["key"])
                    new.append(record)
        append_jsonl(self.main, new)
        for path in shards:  # only once their lines are safely in the main file
            path.unlink()
