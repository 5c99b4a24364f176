"""OpenAI-compatible serving with per-request mitigation (``mitigate serve``; needs the ``serve`` extra).

>>> from mitigate.serve import build, run
>>> run(build("builtin:tiny-llava", method="var"), port=8000)

Importing this package needs nothing beyond mitigate's core; ``build`` and ``run`` need fastapi and uvicorn.
"""

from typing import Any

__all__ = ["build", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
