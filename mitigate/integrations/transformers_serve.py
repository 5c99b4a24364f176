"""Run Hugging Face's ``transformers serve`` with every model it loads mitigated.

    python -m mitigate.integrations.transformers_serve --method var [--set tau=10] -- \\
        llava-hf/llava-1.5-7b-hf --port 8000 --device cuda

Everything after ``--`` is ``transformers serve``'s own arguments. The launcher enables
``attn_implementation="mitigate"`` (:mod:`.transformers_attention`) with the given default and loads every
model under it, then hands over to ``transformers serve``.

Limits, as of transformers 5.24 (checked against its source):

* One mitigation per server, for every request: ``transformers serve`` has no per-request hook. Use
  ``mitigate serve`` for a per-request ``mitigation`` field.
* ``transformers serve --attn-implementation`` accepts only eager, sdpa, flash-attention, flex-attention or
  a Hub kernel name; a registered name such as ``mitigate`` is refused by its own check. So the launcher
  takes ``--attn-implementation mitigate`` out of the arguments and loads the models with it itself; any
  other value is refused (mitigate routes the language model's attention through its own function).
* Caches: its default path runs one request at a time through ``model.generate`` with a dynamic cache and
  no prefix reuse between requests; that is the mode that works. ``--compile`` (static cache compiled with
  ``torch.compile``: per-step state would be baked into the graph) and ``--continuous-batching`` (paged
  attention packs several requests into one sequence; it applies to text-only models anyway) are refused.
  A request's own ``generation_config`` that asks for a static or offloaded-static cache is not inspected:
  do not send one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

REFUSED = {
    "--compile": "torch.compile with a static cache bakes mitigate's per-step state into the graph",
    "--continuous-batching": "paged continuous batching packs several requests into one sequence, which "
    "mitigate's per-row token layout does not describe",
}


def parse_method(text: str) -> Any:
    """``var``, ``var,vhr`` or a JSON object ``{"var": {"tau": 10}}``."""
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names[0] if len(names) == 1 else names


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def serve_args(args: list[str]) -> list[str]:
    """``transformers serve``'s arguments, checked: refused flags raise, ``--attn-implementation mitigate``
    is dropped (the launcher applies it)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name in REFUSED:
            raise SystemExit(f"mitigate: {name} is not supported with mitigation: {REFUSED[name]}")
        if name == "--attn-implementation":
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if value != "mitigate":
                raise SystemExit(
                    f"mitigate: --attn-implementation {value!r}: the launcher serves with mitigate's "
                    "attention; drop the option or set it to mitigate"
                )
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    own, rest = split_args(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="python -m mitigate.integrations.transformers_serve",
        description="transformers serve, with every model it loads mitigated. Arguments after -- go to "
        "transformers serve.",
    )
    parser.add_argument("--method", default="var", help="method or preset, var,vhr, or a JSON object")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a parameter: key=value")
    parser.add_argument("--kernel", default="auto")
    opts = parser.parse_args(own)
    overrides: dict[str, Any] = {}
    for item in opts.sets:
        if "=" not in item:
            parser.error(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    args = serve_args(rest)
    method = parse_method(opts.method)

    from ..errors import UnknownMethodError
    from ..methods import find_preset
    from .transformers_attention import enable

    for name in [method] if isinstance(method, str) else list(method):
        try:  # names now; parameters are checked against the model when it loads
            find_preset(name)
        except UnknownMethodError as exc:
            parser.error(str(exc))
    enable(method, kernel=opts.kernel, force=True, **overrides)
    from transformers.cli.transformers import app

    app(["serve", *args], prog_name="transformers")


if __name__ == "__main__":  # pragma: no cover
    main()
