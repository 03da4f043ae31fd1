"""fescale's one error hierarchy, at the bottom of the layers so the runtime and the engine share it.

Each class says whose fault it is and how a caller reacts, in one place:
- a batch job (`fescale run`, `distill`) stops on a `ConfigError` before any actor starts, records a
  `PromptError` in the errors file and goes on with the other prompts, and stops with one line on a
  `BackendError` (a model or endpoint that is gone for every prompt);
- the Serve app answers every error with its `status`, OpenAI error `type` and `code` (one mapping,
  `engine.openai_protocol.error_response`); nothing decides a status by reading a message.

`unwrap_ray_error` is the one place that digs fescale's own error out of Ray's wrapping.
"""

from __future__ import annotations


class FescaleError(Exception):
    """Base class of every error fescale raises on purpose. Unclassified: an internal fault (500)."""

    status = 500
    type = "server_error"
    code = "internal_error"
    param: str | None = None  # the request field at fault, where there is one

    def __init__(self, message: str = "", *, param: str | None = None, code: str | None = None):
        """`param` names the request field at fault; `code` refines the class's code (`invalid_json`)."""
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code
        super().__init__(message)


class ConfigError(FescaleError):
    """The config (YAML, overrides, a CLI flag or a value in them) is invalid; the message names the key.

    In the Serve app the server's own config is fixed at start, so a ConfigError there is ours (500);
    a request's knobs that make an invalid config are a `RequestError`."""

    code = "invalid_config"


class InputError(FescaleError):
    """One input row is malformed; the message names the file, line and field."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_input"

    def __init__(self, message: str, *, source: str = "", line: int | None = None):
        self.source = source
        self.line = line
        where = f"{source}:{line}: " if source and line is not None else ""
        super().__init__(f"{where}{message}")


class PromptError(FescaleError):
    """This one prompt (a batch row or an HTTP request) cannot be completed; the others go on."""


class RequestError(PromptError):
    """The request is the caller's fault: invalid as asked (a knob, a cap, a message, a parameter)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RequestTooLargeError(RequestError):
    """The request body is over the server's size limit (checked before it is read whole)."""

    status = 413
    code = "request_too_large"


class ContextLengthError(RequestError):
    """The prompt (with what the request asks to generate) does not fit the model's context."""

    code = "context_length_exceeded"


class PromptCrashError(PromptError):
    """The prompt's model call killed or hung its replica every time it ran alone: ours to fix (5xx),
    but only this prompt fails."""

    code = "replica_crashed"


class AuthError(FescaleError):
    """A missing or wrong API key."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(FescaleError):
    """The request names something this server does not have (a model, a route that is off)."""

    status = 404
    type = "not_found_error"
    code = "not_found"


class DeadlineError(PromptError):
    """The request ran past its deadline; its model calls were cancelled, nobody would read them."""

    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class BackendError(FescaleError):
    """A model backend failed for reasons not the prompt's own (engine crash, endpoint down after all
    retries, a pool out of restarts)."""

    code = "backend_error"


def unwrap_ray_error(error: BaseException) -> FescaleError | None:
    """The fescale error inside Ray's (and Ray Data's) wrapping of a remote failure, or None.

    Ray re-raises an actor's or task's exception as a `RayTaskError` whose `cause` is the original;
    Ray Data chains its own errors on top. Walks both until it finds a `FescaleError`."""
    import ray

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ray.exceptions.RayTaskError):
            if isinstance(current.cause, FescaleError):
                return current.cause
        elif isinstance(current, FescaleError):
            return current
        current = current.__cause__ or current.__context__
    return None


def last_line(error: BaseException) -> str:
    """The last line of a remote failure (its own message, without Ray's traceback around it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
