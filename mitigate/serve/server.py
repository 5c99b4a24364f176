"""``mitigate serve``: load a model, build the app, run it under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..loading import load_model
from .app import Settings, context_length, create_app
from .engine import Engine
from .images import ImageLimits
from .specs import Spec, parse


def default_spec(method: str | dict[str, Any] | None, params: dict[str, Any]) -> Spec:
    """The server's default from ``--method`` (``none`` for vanilla; ``var,vhr`` to compose) and ``--set``;
    or a mitigation value as a request would give it (``{"var": {"tau": 15}, "vhr": {}}``)."""
    if isinstance(method, dict):
        if params:
            raise ValueError("give the parameters inside the mitigation value")
        return parse(method)
    if method is None or method.strip().lower() in ("none", "vanilla", ""):
        if params:
            raise ValueError("--set needs a --method")
        return Spec()
    if params:
        return parse({"method": method, "params": params})
    return parse(method)


def build(
    model: str,
    *,
    method: str | dict[str, Any] | None = "var",
    params: dict[str, Any] | None = None,
    dtype: str | None = None,
    device_map: str | None = None,
    kernel: str = "auto",
    served_model_name: str | None = None,
    max_batch: int = 8,
    batch_wait_ms: float = 10.0,
    max_queue: int = 1024,
    max_tokens_limit: int = 1024,
    limits: ImageLimits | None = None,
):
    """The FastAPI app serving ``model`` (the model is loaded here; the worker starts with the app)."""
    spec = default_spec(method, params or {})
    net, processor = load_model(model, dtype=dtype, device_map=device_map)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # batched generation pads on the left
    engine = Engine(
        net, processor, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue, kernel=kernel
    )
    settings = Settings(
        model_name=served_model_name or model,
        default_spec=spec,
        limits=limits or ImageLimits(),
        max_tokens_limit=max_tokens_limit,
        context_length=context_length(net),
    )
    return create_app(engine, settings)


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mitigate").setLevel(log_level.upper())
    # one line per request comes from mitigate.serve; uvicorn's access log would double it
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def local_dir(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"--allow-local-files {value!r} is not a folder")
    return path.resolve()
