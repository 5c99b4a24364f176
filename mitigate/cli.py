"""The ``mitigate`` command line: run, methods, families, calibrate (and the eval commands as they land)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .cli_errors import new_app
from .evals.cli import register as register_evals
from .method_options import is_vanilla, method_request, parse_method, parse_sets
from .serve.cli import register as register_serve

# Every command runs under one error path (mitigate.cli_errors): bad input is one line, never a traceback.
app = new_app(
    add_completion=False, no_args_is_help=True, help="Training-free hallucination mitigation for VLMs."
)
console = Console()
register_evals(app)  # eval, score, report
register_serve(app)  # serve (needs the serve extra when run)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="builtin:tiny-llava, a local folder or a HF id")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto")]
DeviceOpt = Annotated[str | None, typer.Option("--device-map", help="e.g. cuda, cpu, auto")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a parameter: key=value, or method.key=value in a composition"),
]

__all__ = ["app", "parse_method", "parse_sets"]


@app.command()
def run(
    model: ModelOpt = "builtin:tiny-llava",
    method: Annotated[str, typer.Option(help="method or preset; several as var,vhr")] = "var",
    image: Annotated[str, typer.Option(help="image file or builtin:sample")] = "builtin:sample",
    prompt: Annotated[str, typer.Option(help="the user's question")] = "Describe this image in detail.",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 24,
    kernel: Annotated[str, typer.Option(help="auto, reference, torch, ...")] = "auto",
    set_: SetOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceOpt = None,
) -> None:
    """Answer one prompt with and without the mitigation, side by side, with what the edit moved."""
    import torch

    from .api import apply_mitigation
    from .errors import ConfigError
    from .loading import chat_prompt, load_image, load_model, model_device

    if is_vanilla(method):
        raise ConfigError(
            "mitigate run shows the vanilla answer beside a mitigated one: give a method to compare "
            "(e.g. --method var; mitigate methods lists them)"
        )
    request = method_request(method, parse_sets(set_))  # names and values, before loading anything
    picture = load_image(image)
    net, processor = load_model(model, dtype=dtype, device_map=device_map)

    def mitigate():
        return apply_mitigation(net, request.spec, kernel=kernel, processor=processor, **request.overrides)

    mitigate().remove()  # what depends on the model (layers, family), checked before generating anything
    inputs = processor(images=picture, text=chat_prompt(processor, prompt), return_tensors="pt")
    inputs = inputs.to(model_device(net))
    start = inputs["input_ids"].shape[1]
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False}
    with torch.no_grad():
        vanilla = net.generate(**inputs, **settings)
        handle = mitigate()
        try:
            with handle.recording() as stats:
                edited = net.generate(**inputs, **settings)
            description = repr(handle)
        finally:
            handle.remove()
    decode = processor.tokenizer.batch_decode
    table = Table(title=f"{model}  |  {prompt}", show_lines=True)
    table.add_column("vanilla", overflow="fold")
    table.add_column(str(method), overflow="fold")
    table.add_row(
        decode(vanilla[:, start:], skip_special_tokens=True)[0],
        decode(edited[:, start:], skip_special_tokens=True)[0],
    )
    console.print(description, markup=False, highlight=False)
    console.print(table)
    print_stats(stats.summary())


def print_stats(summary: dict[str, dict[int, dict[str, float]]]) -> None:
    """Per layer: how many query rows each method edited; for mass transfers (VAR), how many
    (row, head) pairs passed its gate and the attention mass they moved on average."""
    edited = {n: v for n, v in summary.items() if any(x.get("edited_rows", 0) for x in v.values())}
    if not edited:
        console.print("No attention edit happened (no layer met the method's conditions).")
        return
    for name, layers in edited.items():
        moves = any("moved" in v for v in layers.values())
        table = Table(title=f"{name}: what the edit did, per layer (prefill and every decode step)")
        table.add_column("layer", justify="right")
        table.add_column("edited query rows", justify="right")
        if moves:
            table.add_column("gated head-rows", justify="right")
            table.add_column("of", justify="right")
            table.add_column("mass moved per gated head-row", justify="right")
        for layer, values in layers.items():
            row = [str(layer), f"{values.get('edited_rows', 0):.0f}"]
            if moves:
                heads, rows = values.get("heads", 0.0), values.get("rows", 0.0)
                moved = values.get("moved", 0.0) / heads if heads else 0.0
                row += [f"{heads:.0f}", f"{rows:.0f}", f"{moved:.4f}"]
            table.add_row(*row)
        console.print(table)


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Every method and preset, with its parameters, defaults and where each number comes from."""
    from .methods import list_methods, presets
    from .methods.registry import method_class

    data: dict[str, Any] = {}
    for name in list_methods():
        cls = method_class(name)
        fields = {k: (f.description or "") for k, f in cls.Config.model_fields.items()}
        data[name] = {
            "summary": cls.summary,
            "parameters": fields,
            "presets": {
                p.name: {
                    "summary": p.summary,
                    "models": list(p.models),
                    "params": p.params,
                    "sources": p.sources,
                }
                for p in presets().values()
                if p.method == name
            },
        }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for name, info in data.items():
        console.rule(f"[bold]{name}[/bold]: {info['summary']}")
        for pname, preset in info["presets"].items():
            table = Table(title=f"preset {pname}: {preset['summary']}", title_justify="left")
            table.add_column("parameter")
            table.add_column("value")
            table.add_column("source", overflow="fold")
            for key, value in preset["params"].items():
                table.add_row(key, json.dumps(value), preset["sources"].get(key, ""))
            console.print(table)


@app.command("families")
def families_cmd(
    as_markdown: Annotated[bool, typer.Option("--markdown", help="the Markdown table of the README")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Which method runs on which model family, or why it refuses (read from each adapter and method on
    the family's built-in tiny model)."""
    from .support import markdown, support_matrix

    rows = support_matrix()
    if as_json:
        data = {
            row.family: {"title": row.title, "model_classes": list(row.model_classes), "builtin": row.builtin,
                         "methods": row.refusals}
            for row in rows
        }  # fmt: skip
        typer.echo(json.dumps(data, indent=2))
        return
    if as_markdown:
        typer.echo(markdown(rows), nl=False)
        return
    methods = list(rows[0].refusals) if rows else []
    reasons = list(dict.fromkeys(r for row in rows for r in row.refusals.values() if r is not None))
    table = Table(title="methods x model families (no: refused at apply time, for the reason below)")
    table.add_column("family")
    for name in methods:
        table.add_column(name)
    for row in rows:
        cells = ["yes" if (r := row.refusals[m]) is None else f"no ({reasons.index(r) + 1})" for m in methods]
        table.add_row(row.title, *cells)
    console.print(table)
    for i, reason in enumerate(reasons, 1):
        console.print(f"({i}) {reason}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def calibrate(
    model: ModelOpt = "builtin:tiny-llava",
    image: Annotated[
        list[str] | None, typer.Option(help="images to probe with (default builtin:sample)")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="prompts to probe with")] = None,
    top: Annotated[int, typer.Option(min=1, help="how many sink dims to recommend")] = 2,
    dtype: DtypeOpt = None,
    device_map: DeviceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print a model's massive-activation dims (VAR's sink_dims), from a few prompts."""
    from .calibrate import calibrate as run_calibration
    from .loading import chat_prompt, load_image, load_model, model_device

    images = [load_image(i) for i in (image or ["builtin:sample"])]
    net, processor = load_model(model, dtype=dtype, device_map=device_map)
    prompts = prompt or ["Describe this image in detail.", "Is there a person in the image?"]
    batches = [
        processor(images=img, text=chat_prompt(processor, p), return_tensors="pt").to(model_device(net))
        for img in images
        for p in prompts
    ]
    result = run_calibration(net, batches, top=top)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(title=f"{model}: largest RMS-normalised activations per layer")
    table.add_column("layer", justify="right")
    table.add_column("top dims (score)")
    for layer, dims in result.per_layer.items():
        table.add_row(str(layer), ", ".join(f"{d} ({s:.1f})" for d, s in dims))
    console.print(table)
    console.print(
        f"recommended sink_dims: {result.recommended}  (use: --set 'sink_dims={result.recommended}')"
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
