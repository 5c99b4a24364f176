"""The support matrix, family x method, generated from the adapters and the methods (``mitigate families``).

For every adapter the family's tiny built-in model is built (offline, random weights: what is read is the
family's structure, not its weights) and asked what apply time asks: the adapter's whole-model refusal
(:meth:`~mitigate.patches.adapters.Adapter.refusal`), then each method's
(:meth:`~mitigate.methods.base.Method.unsupported`) on the adapter's :class:`~mitigate.context.ModelInfo`.
A cell is "yes" or the reason the method refuses that family with ``UnsupportedModelError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .methods import list_methods
from .methods.registry import method_class
from .patches.adapters import adapters, find_adapter


@dataclass
class FamilySupport:
    family: str
    title: str
    model_classes: tuple[str, ...]
    builtin: str | None
    refusals: dict[str, str | None] = field(default_factory=dict)  # method -> reason, None = supported


def support_matrix(load: Callable[[str], tuple[Any, Any]] | None = None) -> list[FamilySupport]:
    """One row per adapter, in the registry's order, one cell per registered method. ``load`` builds a
    built-in model from its id (default :func:`mitigate.builtin.load_model`)."""
    if load is None:
        from .builtin import load_model as load

    rows = []
    for cls in adapters():
        row = FamilySupport(cls.family, cls.title or cls.family, cls.model_classes, cls.builtin)
        if cls.builtin is None:
            raise RuntimeError(f"adapter {cls.family} has no built-in tiny model to read its structure from")
        model, _ = load(cls.builtin)
        adapter = find_adapter(model)
        if type(adapter) is not cls:
            raise RuntimeError(f"{cls.builtin} is found as {adapter.family}, not {cls.family}")
        whole = adapter.refusal()
        info = adapter.info()
        for name in list_methods():
            row.refusals[name] = whole if whole is not None else method_class(name).unsupported(info)
        rows.append(row)
    return rows


def markdown(rows: list[FamilySupport]) -> str:
    """The matrix as a Markdown table, refusals numbered below it."""
    methods = list(rows[0].refusals) if rows else []
    reasons: list[str] = []

    def cell(reason: str | None) -> str:
        if reason is None:
            return "yes"
        if reason not in reasons:
            reasons.append(reason)
        return f"no ({reasons.index(reason) + 1})"

    lines = [
        "| family | model class | built-in | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for row in rows:
        classes = ", ".join(f"`{c}`" for c in row.model_classes)
        cells = " | ".join(cell(row.refusals[m]) for m in methods)
        lines.append(f"| {row.title} | {classes} | `{row.builtin}` | {cells} |")
    if reasons:
        lines.append("")
        for i, reason in enumerate(reasons, 1):
            refused = sorted({m for row in rows for m, r in row.refusals.items() if r == reason})
            lines.append(f"{i}. {', '.join(f'`{m}`' for m in refused)}: {reason}.")
    return "\n".join(lines) + "\n"
