"""Request bodies of the OpenAI-compatible API (pydantic v2) and OpenAI's error shape.

Types are strict, as OpenAI's are: ``"0.5"`` is not a temperature and ``true`` is not a count.
Unknown fields are refused (OpenAI answers "Unrecognized request argument"), so that a typo is
never silently ignored. Parameters this server does not implement (penalties, logprobs, tools,
logit_bias, ...) are accepted only at their neutral value; anything else is a 400 that names them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_STOP = 8  # stop strings (OpenAI allows 4)


class ApiError(Exception):
    """A request the server answers with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _unsupported(name: str, value: Any, neutral: tuple = (None,)) -> Any:
    if value not in neutral:
        allowed = " or ".join("null" if v is None else repr(v) for v in neutral)
        raise ValueError(f"{name} is not supported by this server (only {allowed})")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = False


class ChatMessage(_Strict):
    """One message. ``developer`` is OpenAI's newer name for ``system`` and is rendered as one."""

    # Messages copied back from a response carry null fields (refusal, tool_calls, ...): ignored.
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        """A string, or a list of text parts ({"type": "text", "text": ...}) joined in order."""
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError('only text content is supported: a string or [{"type": "text", "text": ...}]')
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError('must be a string or a non-empty list of {"type": "text", "text": ...} parts')

    def as_template_input(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if len(value) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop strings; got {len(value)}")
            if any(isinstance(s, str) and not s for s in value):
                raise ValueError("stop strings must not be empty")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        return _unsupported(info.field_name, value, (None, 0))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        return _unsupported("logit_bias", value or None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        return _unsupported("logprobs", value, (None, False))

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value):
        return _unsupported("top_logprobs", value, (None, 0))

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value, info):
        return _unsupported(f"{info.field_name} (function calling)", value or None)

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value, info):
        return _unsupported(f"{info.field_name} (function calling)", value, (None, "none", "auto"))

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value != {"type": "text"}:
            raise ValueError('response_format is not supported by this server (only {"type": "text"})')
        return value

    @property
    def completion_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionRequest(_Sampling):
    """``prompt``: a string, a list of strings, a list of token ids, or a list of token-id lists."""

    prompt: list[str | list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(_is_token(t) for t in value):
            return [value]
        if isinstance(value, list) and value and all(
                isinstance(p, str) or (isinstance(p, list) and p and all(_is_token(t) for t in p)) for p in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request; got {len(value)}")
            return value
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids (integers) "
                         "or a list of such lists")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        return _unsupported("echo", value, (None, False))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        return _unsupported("suffix", value)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        return _unsupported("logprobs", value)

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value):
        return _unsupported("best_of", value, (None, 1))

    @property
    def completion_budget(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for this endpoint
