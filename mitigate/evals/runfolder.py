"""A run folder's guards: one run at a time writes it, and it never holds the results of two different runs.

* ``run.lock``: taken for the whole run (an OS file lock, released by the kernel even when the process is
  killed) and holding who took it: pid, host, start time, command. A second run on the same folder is
  refused with those details. A lock file left by a run that died on this host is taken over, with a
  warning; one left by another host is refused (whether that run still goes cannot be told from here).
* ``run.json``: the settings that make the run's results what they are (task, model, resolved method
  parameters, generation settings, and the scoring: POPE's parser, CHAIR's synonym table, Tri-HE's judge
  and extraction models and prompts). A run whose settings differ is refused: its results would overwrite
  these. Give it its own ``--out``; resuming with the same settings goes on where the folder stopped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import RunFolderError
from .jsonl import write_json
from .results import RESULTS

log = logging.getLogger("mitigate")

LOCK = "run.lock"
MANIFEST = "run.json"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: best effort, from the pid in the lock file
    fcntl = None  # type: ignore[assignment]


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it is writing its details right now)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    text = f"pid {info.get('pid')} on host {info.get('host')}, started {started}"
    if info.get("command"):
        text += f": {info['command']}"
    return text


class RunLock:
    """``with RunLock(folder):`` -- the folder's lock for the duration of the block (see the module)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        try:
            info = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return info if isinstance(info, dict) else None

    def _in_use(self, info: dict[str, Any] | None) -> RunFolderError:
        return RunFolderError(
            f"run folder {self.folder} is in use by {_holder(info)}; wait for that run to end or give "
            f"another --out (lock file: {self.path})"
        )

    def _try_lock(self, fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: this file system cannot lock files."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # e.g. ENOLCK on some network file systems
            return None
        return True

    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"run folder {self.folder} is a file; give --out a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._try_lock(fd)
                previous = self._read(fd)
                if locked is False:
                    raise self._in_use(previous)
                try:  # the holder may have removed the file between our open and our lock: start again
                    current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    os.close(fd)
                    continue
                if previous:
                    self._take_over(previous, checked_by_os=locked is True)
                info = {
                    "pid": os.getpid(),
                    "host": _host(),
                    "started": time.time(),
                    "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[
                        :300
                    ],
                }
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(info) + "\n").encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise RunFolderError(f"could not lock run folder {self.folder} (its lock file keeps changing)")

    def _take_over(self, previous: dict[str, Any], *, checked_by_os: bool) -> None:
        """A lock file whose run is gone (the OS lock is free) or, without OS locks, whose pid is dead."""
        if previous.get("host") != _host():
            raise RunFolderError(
                f"run folder {self.folder} was locked by {_holder(previous)}, another machine, and whether "
                f"that run still goes cannot be told from here; if it has ended, delete {self.path}"
            )
        pid = previous.get("pid")
        if not checked_by_os and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise self._in_use(previous)
        log.warning(
            "mitigate: run folder %s: taking over the lock of %s, which ended without releasing it",
            self.folder,
            _holder(previous),
        )

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding the lock: no one can have taken it in between
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _held(folder: Path) -> dict[str, Any] | None:
    """The run a folder holds: its ``run.json``, or for folders older than it, its ``results.json``."""
    path = folder / MANIFEST
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("mitigate: %s is corrupt; it is written anew", path)
            return None
    results = folder / RESULTS
    if results.is_file():
        try:
            data = json.loads(results.read_text())
            model = {k: v for k, v in data["model"].items() if k != "device_map"}
            from .tasks import scoring_of

            return {
                "task": data["task"],
                "label": data["method"]["label"],
                "run_key": data["run_key"],
                "settings": {
                    "model": model,
                    "methods": data["method"]["resolved"],
                    "generation": data["generation"],
                    "scoring": scoring_of(data["task_info"]),
                },
            }
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
    return None


def claim(folder: Path, *, task: str, run_key: str, label: str, settings: dict[str, Any]) -> None:
    """Record that ``folder`` holds this run, or refuse if it holds a different one (call under the lock)."""
    folder = Path(folder)
    held = _held(folder)
    held_settings = dict((held or {}).get("settings") or {})
    if "scoring" not in held_settings:  # written before run.json recorded the scoring: not compared
        settings_compared = {k: v for k, v in settings.items() if k != "scoring"}
    else:
        settings_compared = settings
    same_scoring = held_settings.get("scoring") == settings_compared.get("scoring")
    if held and ((held.get("task"), held.get("run_key")) != (task, run_key) or not same_scoring):
        mine = _flat({"task": task, **settings_compared})
        theirs = _flat({"task": held.get("task"), **held_settings})
        differ = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        shown = ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise RunFolderError(
            f"run folder {folder} holds another run ({held.get('task')}, {held.get('label')}); this one "
            f"differs in {shown or 'its run key'}{more}. Give it its own --out (its results would overwrite "
            "those there)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / MANIFEST, {"task": task, "label": label, "run_key": run_key, "settings": settings})
