"""Every method on every family, on each family's tiny built-in model: ``apply_mitigation`` with the
method's default preset, then greedy ``generate`` for 4 tokens on a left-padded pair of prompts (a wide,
tiled image next to a text-only row, or a small image where the family needs one in every row) changes
the logits and equals each prompt generated alone; ``remove()`` restores bit-identical logits. Or the
method refuses the family at apply time with ``UnsupportedModelError``, exactly where the support matrix
(``mitigate families``, shown in the README) says so. ``pai-released`` adds PAI's image-free contrast,
whose twins run through each family's positions and masks."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import family_kit as fk
import pytest
import torch
from typer.testing import CliRunner

from mitigate import UnsupportedModelError, apply_mitigation, list_methods, mitigated
from mitigate.cli import app
from mitigate.support import markdown, support_matrix

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- mitigate families --markdown -->\n", "<!-- end of mitigate families -->"


def tiny_builtin(spec: str, dtype=None):
    return fk.tiny(spec.removeprefix("builtin:tiny-"))
METHODS = [*list_methods(), "pai-released"]
CASES = [(family, method) for family in fk.FAMILIES for method in METHODS]


@cache
def matrix() -> dict[str, dict[str, str | None]]:
    return {row.family: row.refusals for row in support_matrix(load=tiny_builtin)}


@cache
def prepared(name: str):
    """The family's model and processor, its batch, each row alone, and the vanilla generations."""
    model, processor = fk.tiny(name)
    rows = fk.rows_of(fk.BY_NAME[name])
    batch = fk.encode(processor, rows)
    singles = [fk.encode(processor, [row]) for row in rows]
    return model, processor, batch, singles, fk.generate(model, batch)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f.name}-{m}" for f, m in CASES])
def test_method_runs_or_refuses(family, method):
    if family.needs:
        pytest.importorskip(family.needs, reason=f"{family.name}'s processor refuses to build without it")
    model, processor, batch, singles, vanilla = prepared(family.name)
    refusal = matrix()[family.name][method.split("-")[0]]
    if refusal is not None:
        with pytest.raises(UnsupportedModelError, match=re.escape(refusal[:60])):
            apply_mitigation(model, method, processor=processor)
        assert model.config.get_text_config()._attn_implementation != "mitigate"  # untouched
        return
    handle = apply_mitigation(model, method, processor=processor)
    try:
        edited = fk.generate(model, batch)
        alone = [fk.generate(model, one) for one in singles]
    finally:
        handle.remove()
    assert fk.logit_diff(edited, vanilla) > 1e-3, f"{method} did not change {family.name}'s logits"
    fk.assert_rows_equal(edited, alone)
    after = fk.generate(model, batch)
    assert torch.equal(after.sequences, vanilla.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, vanilla.logits, strict=True))


def test_readme_shows_the_current_matrix():
    """The README's table is ``mitigate families --markdown`` as the adapters and methods say today."""
    text = README.read_text()
    rows = support_matrix(load=tiny_builtin)
    shown = text[text.index(START) + len(START) : text.index(END)]
    assert shown == markdown(rows), "regenerate it: mitigate families --markdown"
    assert {row.family for row in rows} == {f.name for f in fk.FAMILIES}


def test_every_family_has_a_refusal_or_runs_paint_where_it_has_a_cls_token():
    refusals = matrix()
    runs_paint = sorted(name for name, row in refusals.items() if row["paint"] is None)
    assert runs_paint == ["internvl", "llava"]
    assert all(reason is not None for reason in refusals["paligemma2"].values())
    others = [row for name, row in refusals.items() if name != "paligemma2"]
    assert all(reason is None for row in others for method, reason in row.items() if method != "paint")


def test_cli_families(monkeypatch):
    monkeypatch.setattr("mitigate.builtin.load_model", tiny_builtin)
    result = CliRunner().invoke(app, ["families", "--json"])
    assert result.exit_code == 0, result.output
    assert '"paint": null' in result.output and '"qwen3.5"' in result.output
    table = CliRunner().invoke(app, ["families"])
    assert table.exit_code == 0, table.output
    assert "needs a vision tower with a CLS token" in table.output and "Qwen3.5" in table.output


COMPOSED = ["qwen2-vl", "qwen3-vl", "gemma4", "idefics3", "paligemma", "mistral3"]


@pytest.mark.slow
@pytest.mark.parametrize("family", COMPOSED)
def test_composition_runs(family):
    """PAI + VAR + VHR (logit edit, redistribution, head scaling; VHR's probe with the twins) composed."""
    model, processor, batch, singles, vanilla = prepared(family)
    with mitigated(model, ["pai", "var", "vhr"], processor=processor):
        edited = fk.generate(model, batch)
        alone = [fk.generate(model, one) for one in singles]
    assert fk.logit_diff(edited, vanilla) > 1e-3
    fk.assert_rows_equal(edited, alone)
