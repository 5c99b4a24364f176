"""The ``mitigate serve`` command (registered on the main CLI by :func:`register`)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: Annotated[
        str, typer.Option("--model", "-m", help="builtin:tiny-llava, a local folder or a HF id")
    ],
    method: Annotated[
        str,
        typer.Option(
            help="default mitigation when a request names none: a method or preset, var,vhr, or none"
        ),
    ] = "var",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="a parameter of the default method: key=value")
    ] = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16 or auto")] = None,
    device_map: Annotated[str | None, typer.Option("--device-map", help="e.g. cuda, cpu, auto")] = None,
    kernel: Annotated[str, typer.Option(help="auto, reference, torch, ...")] = "auto",
    served_model_name: Annotated[
        str | None, typer.Option(help="the name clients send as 'model' (default: --model)")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="requests per batch (same mitigation)")] = 8,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0, help="how long a request waits for batch mates")
    ] = 10.0,
    max_tokens_limit: Annotated[
        int, typer.Option(min=1, help="the most new tokens a request may ask for")
    ] = 1024,
    max_images: Annotated[int, typer.Option(min=0, help="images per request")] = 8,
    max_image_bytes: Annotated[int, typer.Option(min=1, help="encoded size of one image")] = 20 * 1024 * 1024,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="width x height of one image")] = 40_000_000,
    allow_local_files: Annotated[
        str | None, typer.Option(help="let requests name image files under this folder (off by default)")
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="waiting requests before answering 503")] = 1024,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Serve a model over an OpenAI-compatible API, with a per-request "mitigation" field."""
    # Setup errors (a bad option, method, parameter or model) end with the one-line message every command
    # gives (mitigate.cli_errors, which runs this command), before the server binds its port.
    import fastapi  # noqa: F401  (missing: the message names the serve extra)
    import uvicorn  # noqa: F401

    from ..errors import ConfigError
    from ..method_options import is_vanilla, method_request, parse_sets
    from .errors import APIError
    from .images import ImageLimits
    from .server import build, local_dir, run

    sets = parse_sets(set_)
    if is_vanilla(method):
        if sets:
            raise ConfigError("--set needs a method; vanilla has no parameters")
        default: str | dict | None = None
    else:  # names and values checked before the model is loaded, as for the other commands
        request = method_request(method, sets)
        default = {"method": request.spec, "params": request.overrides} if request.overrides else request.spec
    limits = ImageLimits(
        max_images=max_images,
        max_bytes=max_image_bytes,
        max_pixels=max_image_pixels,
        local_dir=local_dir(allow_local_files),
    )
    try:
        app = build(
            model,
            method=default,
            dtype=dtype,
            device_map=device_map,
            kernel=kernel,
            served_model_name=served_model_name,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            max_queue=max_queue,
            max_tokens_limit=max_tokens_limit,
            limits=limits,
        )
    except APIError as exc:  # the default mitigation does not fit this model (checked against it)
        raise ConfigError(f"--method {method}: {exc.message}") from None
    run(app, host=host, port=port, log_level=log_level)
