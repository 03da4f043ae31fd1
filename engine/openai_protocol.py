"""The OpenAI chat-completions wire format the Serve app speaks: requests in, bodies and SSE chunks out.

Requests are parsed strictly where a mistake would change the answer (roles, empty content, knobs,
`n`) and leniently elsewhere: fields an OpenAI client may send that fescale does not use (`user`,
`stop`, ...) are ignored, as vLLM's server does. Every error body has OpenAI's shape
(`error_response`, the one place an exception becomes an HTTP status).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from actors.errors import FescaleError, RequestError
from engine.modes import ModeName
from engine.rows import PromptState


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_message(self) -> dict:
        """fescale's message: `developer` is OpenAI's newer name for `system`; text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FescaleKnobs(BaseModel):
    """Per-request inference-time-scaling knobs (`extra_body={"fescale": {...}}` in the openai client)."""

    model_config = ConfigDict(extra="forbid")

    mode: ModeName | None = None
    num_responses: PositiveInt | None = Field(None, description="N initial responses")
    feedback_samples: PositiveInt | None = Field(None, description="M feedback per response, spread over the config's temperatures")
    effective_feedback: PositiveInt | None = Field(None, description="E feedback kept after filtering")
    edits_per_set: PositiveInt | None = Field(None, description="K edits per feedback set")
    return_trace: bool = Field(False, description="return candidates, feedback and scores in the `fescale` field")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: PositiveInt = 1
    seed: NonNegativeInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None
    fescale: FescaleKnobs = Field(default_factory=FescaleKnobs)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("fescale returns one selected answer: n must be 1 (ask for more candidates with fescale.num_responses)")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tool calling is not supported by fescale")
        return v

    @model_validator(mode="after")
    def _check_messages(self) -> "ChatCompletionRequest":
        for i, m in enumerate(self.messages):
            if not m.as_message()["content"].strip():
                raise ValueError(f"messages[{i}].content is empty")
        if self.messages[-1].role != "user":
            raise ValueError(f"the last message must be from the user, got role {self.messages[-1].role!r}")
        return self

    @property
    def generation_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict]:
        return [m.as_message() for m in self.messages]


INT64 = 2**63 - 1


def parse_request(body: bytes, max_depth: int = 32, max_messages: int = 512) -> ChatCompletionRequest:
    """The request body, or a `RequestError` (400) that says what is wrong and where.

    What Python's own JSON decoding would turn into a 500 is caught here, before any work: nesting
    deeper than `max_depth` (json.loads itself fails with RecursionError near 1,000 levels), integers
    beyond 64 bits (over 4,300 digits json.loads raises ValueError), text that UTF-8 cannot hold (a
    lone surrogate such as "\\ud800" parses, then fails when a tokenizer or a log encodes it), and more
    than `max_messages` messages."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestError(f"request body nests deeper than {max_depth} levels", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        reason = "an integer is too large" if "integer string conversion" in str(e) else f"{e}"
        raise RequestError(f"request body is not valid JSON: {reason}", code="invalid_json") from None
    check_values(data, max_depth)
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise RequestError(f"messages: {len(messages)} messages; this server takes at most {max_messages} (serve.max_messages)", param="messages")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown knob; valid: {', '.join(FescaleKnobs.model_fields)}"
        elif err["type"] == "missing":
            message = "is required"
        raise RequestError(f"{param}: {message}" if param else message, param=param) from None


def check_values(data: Any, max_depth: int) -> None:
    """Walk parsed JSON without recursion: depth, 64-bit integers and encodable text; a `RequestError`
    names the first offending field (`messages.0.content`)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise RequestError(f"{path or 'request body'}: nested deeper than {max_depth} levels (serve.max_json_depth)", param=path or None, code="invalid_json")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, f"a key in {path or 'the request body'}", path)
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, str):
            _check_text(value, path or "request body", path)
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 - 1 <= value <= INT64:
            raise RequestError(f"{path or 'request body'}: integer out of range (64-bit)", param=path or None)


def _check_text(text: str, where: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{where}: not valid Unicode (a lone surrogate at character {e.start})", param=param or None) from None


def error_response(error: BaseException, request_id: str) -> tuple[int, dict]:
    """The one exception -> HTTP mapping: (status, OpenAI error body).

    A fescale error answers with its own class's status, type and code (`actors.errors`), so a
    client's SDK raises its usual exception (`openai.BadRequestError`, `AuthenticationError`, ...).
    A 4xx says what to change. A 500 (ours: a backend, a crash, a bug) says only "internal error"
    with the request id; its detail (an endpoint's URL, a path, a process id) goes to the server log."""
    if isinstance(error, FescaleError):
        status, kind, code, message = error.status, error.type, error.code, str(error)
    else:
        status, kind, code, message = 500, "server_error", "internal_error", ""
    if status == 500:
        message = f"internal error (request id {request_id})"
    return status, {"error": {"message": message, "type": kind, "param": getattr(error, "param", None), "code": code}}


def usage_body(state: PromptState) -> dict:
    """Tokens of every stage (generate, feedback, edit, select), not only the final answer's."""
    prompt = sum(u.prompt_tokens for u in state.usage.values())
    completion = sum(u.completion_tokens for u in state.usage.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def trace_body(state: PromptState) -> dict:
    """Why the answer won: mode, candidates with feedback, sets, edits and scores, the selection, usage per stage."""
    return state.model_dump(mode="json", include={"mode", "config_hash", "selected", "candidates", "usage"})


class Completion:
    """The answer of one request, as one body or as a stream of SSE chunks."""

    def __init__(self, model: str, state: PromptState, trace: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.state, self.trace = model, state, trace

    def body(self) -> dict:
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.state.final}, "finish_reason": self.state.final_finish_reason()}],
            "usage": usage_body(self.state),
        }
        if self.trace:
            body["fescale"] = trace_body(self.state)
        return body

    def chunks(self, include_usage: bool, piece_chars: int = 32) -> list[str]:
        """SSE events: the role, the answer in pieces, the finish reason, usage if asked, `[DONE]`."""
        text = self.state.final or ""
        deltas = [{"role": "assistant", "content": ""}] + [{"content": text[i : i + piece_chars]} for i in range(0, len(text), piece_chars)]
        events = [self._chunk([{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
        last = self._chunk([{"index": 0, "delta": {}, "finish_reason": self.state.final_finish_reason()}])
        if self.trace:
            last["fescale"] = trace_body(self.state)
        events.append(last)
        if include_usage:
            events.append(self._chunk([], usage=usage_body(self.state)))
        return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]

    def _chunk(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices, **extra}
