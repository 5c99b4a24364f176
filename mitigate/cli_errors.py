"""One error path for the whole command line: an expected failure ends a command with one line on stderr
and a non-zero exit, never a traceback. ``MITIGATE_DEBUG=1`` lets the traceback through.

Every command of an app made by :func:`new_app` (the ``mitigate`` app is one) runs under
:func:`clean_errors`, through the app's group class :class:`CleanGroup`: a new command needs nothing.
Elsewhere (a Typer app of its own, a script) use ``with clean_errors():`` or decorate a function with
``@clean_errors()``.

Exit codes: 2 for bad input (fix it and rerun), 1 for anything unexpected (a bug: the message says so).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

EXIT_INPUT = 2
EXIT_BUG = 1
MAX_CHARS = 400  # one line on a wide terminal, two on a narrow one
_DEBUG_OFF = {"", "0", "false", "no", "off"}


def debug_enabled() -> bool:
    return os.environ.get("MITIGATE_DEBUG", "").strip().lower() not in _DEBUG_OFF


def one_line(text: str, limit: int = MAX_CHARS) -> str:
    """The first non-empty line of ``text``, whitespace collapsed, cut at ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = " ".join(lines[0].split()) if lines else ""
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    elif len(lines) > 1 and not line.endswith((".", ":", ";")):
        line += " ..."
    return line


def validation_message(error: Any) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: what is wrong (got value)``, without the URL."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(x) for x in item.get("loc", ())) or "value"
        text = f"{where}: {item.get('msg', 'invalid')}"
        if "input" in item and not isinstance(item["input"], dict):
            text += f" (got {item['input']!r})"
        parts.append(text)
    return "; ".join(parts)


def _validation_error(error: BaseException) -> Any:
    from pydantic import ValidationError

    seen = error
    while seen is not None:
        if isinstance(seen, ValidationError):
            return seen
        seen = seen.__cause__
    return None


def _expected_types() -> tuple[type[BaseException], ...]:
    from .errors import MitigationError
    from .evals.coco import CocoSetupError, SampleError
    from .evals.jsonl import JsonlError

    return (MitigationError, CocoSetupError, SampleError, JsonlError)


def describe(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or ``None`` for one that is a bug."""
    invalid = _validation_error(error)
    if invalid is not None:
        head = str(error).replace(str(invalid), "").strip().rstrip(":").strip()
        if head == str(error).strip():  # the wrapper does not quote pydantic's text: keep its own words
            head = one_line(head).rstrip(":")
        detail = validation_message(invalid)
        return one_line(f"{head}: {detail}" if head else detail)
    if type(error).__name__ == "OutOfMemoryError":  # torch's, without importing torch
        return (
            "out of memory on the device: lower --batch-size, use --dtype bfloat16, or a smaller model "
            f"({one_line(str(error), 160)})"
        )
    if isinstance(error, _expected_types()):
        return one_line(str(error))
    if isinstance(error, ImportError):
        missing = getattr(error, "name", None) or ""
        hint = ""
        if missing.split(".")[0] in {"matplotlib", "nltk", "textblob"}:
            hint = " (install the evaluation extras: pip install 'mitigate[evals]')"
        elif missing.split(".")[0] in {"fastapi", "uvicorn"}:
            hint = " (install the server extras: pip install 'mitigate[serve]')"
        return one_line(f"{error}{hint}")
    if isinstance(error, OSError):
        if error.filename is not None and error.strerror:
            return one_line(f"{error.filename}: {error.strerror}")
        return one_line(str(error) or type(error).__name__)
    if isinstance(error, ValueError):
        return one_line(str(error) or type(error).__name__)
    return None


def report(error: BaseException) -> int:
    """Print the message for ``error`` on stderr; returns the exit code."""
    message = describe(error)
    if message is not None:
        typer.echo(f"Error: {message}", err=True)
        return EXIT_INPUT
    typer.echo(
        f"Error: internal error (a bug in mitigate): {type(error).__name__}: {one_line(str(error), 240)}",
        err=True,
    )
    typer.echo("Rerun with MITIGATE_DEBUG=1 to see the traceback, and please report it.", err=True)
    return EXIT_BUG


@contextmanager
def clean_errors() -> Iterator[None]:
    """Turn any exception into a short message and ``typer.Exit``; click's own exits and usage errors, and
    Ctrl-C, pass through unchanged. With ``MITIGATE_DEBUG=1`` everything passes through."""
    try:
        yield
    except Exception as error:
        if debug_enabled() or _is_click_exit(error):
            raise
        raise typer.Exit(report(error)) from None


def _is_click_exit(error: BaseException) -> bool:
    """click's exits and usage errors (recent typer ships its own copy of click: match by name)."""
    return any(c.__name__ in {"ClickException", "Exit", "Abort"} for c in type(error).__mro__)


class CleanGroup(TyperGroup):
    """A Typer group whose commands (and sub-groups' commands) all run under :func:`clean_errors`."""

    def invoke(self, ctx: Any) -> Any:
        with clean_errors():
            return super().invoke(ctx)


def hide_flag_types() -> None:
    """Recent typer prints a type column in ``--help``, which for a flag (``--help``, ``--json``) is a
    meaningless ``<bool>``: show no type for flags. A no-op on typer versions without that column."""
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_mitigate_hides_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._mitigate_hides_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def new_app(**kwargs: Any) -> typer.Typer:
    """A Typer app whose every command has the clean error path (and a help without ``<bool>``)."""
    hide_flag_types()
    kwargs.setdefault("cls", CleanGroup)
    kwargs.setdefault("pretty_exceptions_show_locals", False)  # MITIGATE_DEBUG=1: no tensors dumped
    return typer.Typer(**kwargs)
