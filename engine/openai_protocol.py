"""The OpenAI chat-completions wire format the Serve app speaks: requests in, bodies and SSE chunks out.

Requests are parsed strictly where a mistake would change the answer (roles, empty content, knobs,
`n`, `stop`, the parameters fescale cannot honour: `ChatCompletionRequest.UNSUPPORTED`) and leniently
elsewhere: fields that do not change the answer (`user`, `metadata`, `store`, ...) are ignored, as
vLLM's server does. Every error body has OpenAI's shape
(`error_response`, the one place an exception becomes an HTTP status).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from actors.errors import FescaleError, RequestError
from engine.modes import ModeName
from engine.rows import PromptState
from engine.summary import row_stats


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
    deadline_s: float | None = Field(None, gt=0, description="seconds until a 504 that cancels the request's model calls [serve.deadline_s]")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: PositiveInt = Field(1, description="choices: the n best candidates by the selector, best first (engine.knobs caps it)")
    seed: NonNegativeInt | None = None
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    fescale: FescaleKnobs = Field(default_factory=FescaleKnobs)

    # OpenAI parameters that would change the answer and that fescale cannot honour -> (the values
    # that ask for nothing, besides absent or null; why not). Ignoring one would hand the client an
    # answer that silently breaks its contract (free text where it asked for JSON, no log-probs, a
    # tool call that never comes), so each is refused with a 400 that names it.
    UNSUPPORTED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "response_format": (({"type": "text"},), "the answer is free text, written, edited and selected by the method"),
        "logprobs": ((False,), "the answer is selected among candidates; its log-probabilities are not returned"),
        "top_logprobs": ((0,), "the answer is selected among candidates; its log-probabilities are not returned"),
        "logit_bias": (({},), "token biases are not passed to the models"),
        "tools": (([],), "tool calling is not supported"),
        "tool_choice": (("none",), "tool calling is not supported"),
        "functions": (([],), "tool calling is not supported"),
        "function_call": (("none",), "tool calling is not supported"),
        "presence_penalty": ((0, 0.0), "repetition penalties are not passed to the models"),
        "frequency_penalty": ((0, 0.0), "repetition penalties are not passed to the models"),
        "modalities": ((["text"],), "the answer is text only"),
        "audio": ((), "the answer is text only"),
    }
    MAX_STOPS: ClassVar[int] = 4  # OpenAI's
    MAX_STOP_CHARS: ClassVar[int] = 256  # bounds the HF backend's check at every generated token

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """A `RequestError` (raised through pydantic as is) naming the first unsupported parameter set."""
        for name, (asks_nothing, why) in cls.UNSUPPORTED.items():
            value = data.get(name) if isinstance(data, dict) else None
            if value is not None and not any(type(value) is type(ok) and value == ok for ok in asks_nothing):
                shown = json.dumps(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise RequestError(f"{name}={shown} is not supported: {why}; remove it", param=name, code="unsupported_parameter")
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, v: Any) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or len(stops) > cls.MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= cls.MAX_STOP_CHARS for s in stops):
            raise ValueError(f"must be a string or a list of up to {cls.MAX_STOPS} strings, each of 1 to {cls.MAX_STOP_CHARS} characters")
        return stops

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


def parse_request(body: bytes, max_depth: int = 32, max_messages: int = 512, headers: Mapping[str, str] | None = None) -> ChatCompletionRequest:
    """The request body, or a `RequestError` (400) that says what is wrong and where.

    What Python's own JSON decoding would turn into a 500 is caught here, before any work: nesting
    deeper than `max_depth` (json.loads itself fails with RecursionError near 1,000 levels), integers
    beyond 64 bits (over 4,300 digits json.loads raises ValueError), text that UTF-8 cannot hold (a
    lone surrogate such as "\\ud800" parses, then fails when a tokenizer or a log encodes it), and more
    than `max_messages` messages. Knobs may also come as `X-Fescale-<knob>` headers (`header_knobs`),
    for clients that cannot add a body field; the body's own `fescale` values win."""
    from_headers = header_knobs(headers or {})
    try:
        data = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise RequestError(f"request body nests deeper than {max_depth} levels", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        reason = "an integer is too large" if "integer string conversion" in str(e) else f"{e}"
        raise RequestError(f"request body is not valid JSON: {reason}", code="invalid_json") from None
    check_values(data, max_depth)
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    if from_headers:
        data["fescale"] = {**from_headers, **(data["fescale"] if isinstance(data.get("fescale"), dict) else {})}
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise RequestError(f"messages: {len(messages)} messages; this server takes at most {max_messages} (serve.max_messages)", param="messages")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        param, message = _described(e)
        raise RequestError(f"{param}: {message}" if param else message, param=param) from None


HEADER_PREFIX = "x-fescale-"


def header_knobs(headers: Mapping[str, str]) -> dict[str, str]:
    """`X-Fescale-Num-Responses: 4` -> {"num_responses": "4"} (checked: an unknown knob or a bad value
    is a 400 naming the header). Values stay strings; the knobs' own types parse them."""
    knobs = {k.lower().removeprefix(HEADER_PREFIX).replace("-", "_"): v for k, v in headers.items() if k.lower().startswith(HEADER_PREFIX)}
    for name, value in knobs.items():
        header = HEADER_PREFIX + name.replace("_", "-")
        if name not in FescaleKnobs.model_fields:
            raise RequestError(f"header {header}: unknown knob; valid: {', '.join(HEADER_PREFIX + k.replace('_', '-') for k in FescaleKnobs.model_fields)}", param=header)
        try:
            FescaleKnobs.model_validate({name: value})
        except ValidationError as e:
            raise RequestError(f"header {header}: {_described(e)[1]}", param=header) from None
    return knobs


def knobs_problem(knobs: Any, modes: list[str] | None = None) -> str | None:
    """What is wrong with a `fescale` knobs object ("retries: unknown knob; ..."), or None. The config's
    `serve.model_presets` are checked here at load, by the same rules as a request's own knobs."""
    try:
        parsed = FescaleKnobs.model_validate(knobs)
    except ValidationError as e:
        param, message = _described(e)
        return f"{param}: {message}" if param else message
    if modes and parsed.mode and parsed.mode not in modes:
        return f"mode: {parsed.mode!r} is not in serve.modes"
    return None


def _described(error: ValidationError) -> tuple[str | None, str]:
    """(the field, what is wrong) of the first error, in words a client can act on."""
    err = error.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown knob; valid: {', '.join(FescaleKnobs.model_fields)}"
    elif err["type"] == "missing":
        message = "is required"
    return param, message


def _not_json(name: str) -> None:
    """json.loads takes NaN and Infinity; JSON (and every knob) has no such numbers."""
    raise ValueError(f"{name} is not a JSON number")


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
    """Why the answer won: mode, candidates with feedback, sets, edits and scores, the selection, usage
    per stage, and the run summary's counts of this one prompt (feedback unparseable or perfectly
    helpful, no-edits: `engine.summary.row_stats`)."""
    row = state.to_dict()
    body = {k: row[k] for k in ("mode", "config_hash", "selected", "candidates", "usage")}
    body["counts"] = {k: v for k, v in row_stats(state).items() if k not in ("failed", "tokens")}
    return body


class Completion:
    """The answer of one request, as one body or as a stream of SSE events.

    A stream opens at once with the assistant role, then sends an SSE comment as each step of the
    method finishes (clients skip comments; a gateway sees a live connection, a user sees progress),
    then the answer in pieces, the finish reason, usage if asked and `[DONE]`. The method picks its
    answer only at the end, so the answer's text cannot come sooner than that (greedy's can: its
    tokens come as `delta`s). With `n` > 1 the choices are the n best candidates, best first."""

    def __init__(self, model: str, trace: bool, n: int = 1):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.trace, self.n = model, trace, n

    def body(self, state: PromptState) -> dict:
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": reason} for k, (text, reason) in enumerate(state.ranked(self.n))
            ],
            "usage": usage_body(state),
        }
        if self.trace:
            body["fescale"] = trace_body(state)
        return body

    def opening(self) -> str:
        return _event(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))

    @staticmethod
    def progress(step: str, seconds: float) -> str:
        return f": fescale {step} done in {seconds:.2f}s\n\n"

    def delta(self, text: str) -> str:
        """A piece of the answer as the model generates it (greedy streams its tokens)."""
        return _event(self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}]))

    def closing(self, state: PromptState, include_usage: bool, streamed: int = 0, piece_chars: int = 32) -> list[str]:
        """The answer in pieces (after its first `streamed` characters, sent as deltas already), the
        finish reason (and the trace if asked), usage if asked, `[DONE]`."""
        events = []
        for k, (text, reason) in enumerate(state.ranked(self.n)):
            text = text[streamed:] if k == 0 else text
            if k > 0:  # every choice opens with its role, as OpenAI streams n choices
                events.append(self._chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
            events += [self._chunk([{"index": k, "delta": {"content": text[i : i + piece_chars]}, "finish_reason": None}]) for i in range(0, len(text), piece_chars)]
            events.append(self._chunk([{"index": k, "delta": {}, "finish_reason": reason}]))
        if self.trace:
            events[-1]["fescale"] = trace_body(state)
        if include_usage:
            events.append(self._chunk([], usage=usage_body(state)))
        return [_event(e) for e in events] + [DONE]

    @staticmethod
    def failed(body: dict) -> list[str]:
        """A failure after the stream opened (its status is sent already): the error body as an event, as vLLM does."""
        return [_event(body), DONE]

    def _chunk(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices, **extra}


DONE = "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
