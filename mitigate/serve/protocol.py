"""The request body of ``/v1/chat/completions``: OpenAI's fields this server honours, plus ``mitigation``.

Fields OpenAI defines that the server cannot honour exactly (tools, log-probabilities, several choices, ...)
are refused with a 400 naming them, never ignored. Fields it does not know are ignored, as OpenAI's
clients may send vendor extras.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError, bad_request


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # per-request mitigation: absent -> the server's default; null -> none (vanilla); else a method spec
    mitigation: Any = None

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request("stop takes at most 4 non-empty strings", code="invalid_stop", param="stop")
        return stops

    @property
    def sampling(self) -> bool:
        """Greedy unless a temperature above zero is asked for (omitted: greedy, as mitigate evaluates)."""
        return bool(self.temperature)


#: OpenAI fields whose meaning this server cannot deliver, with the value that asks for nothing
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "best_of": (None, 1),
}


def parse_request(data: Any) -> ChatRequest:
    """Validate a decoded JSON body; every refusal is a 400 that names the field."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_request")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", code="invalid_request", param=where or None) from exc
    for name, neutral in UNSUPPORTED.items():
        if name in data and data[name] not in neutral:
            raise bad_request(
                f"{name} is not supported by this server", code="unsupported_parameter", param=name
            )
    if request.n not in (None, 1):
        raise bad_request(
            "n must be 1: this server returns one choice", code="unsupported_parameter", param="n"
        )
    response_format = data.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request(
            "response_format other than text is not supported",
            code="unsupported_parameter",
            param="response_format",
        )
    request.stops  # noqa: B018  (validates stop)
    return request


def mitigation_given(data: dict[str, Any]) -> bool:
    """Whether the body names a mitigation at all (``null`` counts: it asks for none)."""
    return "mitigation" in data


__all__ = ["APIError", "ChatRequest", "Message", "mitigation_given", "parse_request"]
