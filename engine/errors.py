"""One error hierarchy for fescale.

Each class says whose fault it is, so the CLI, the pipeline and the Serve app can react the same way:
a `ConfigError` stops before any actor starts, an `InputError` skips one input row into the errors
file, a `RequestError` fails one prompt (row or HTTP request) and the job goes on, a `BackendError`
is a model or endpoint failure that is not the caller's fault.
"""

from __future__ import annotations


class FescaleError(Exception):
    """Base class of every error fescale raises on purpose."""


class ConfigError(FescaleError):
    """The config (YAML, overrides or a value in it) is invalid; the message names the key."""


class InputError(FescaleError):
    """One input row is malformed; the message names the file, line and field."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None):
        self.source = source
        self.line = line
        where = f"{source}:{line}: " if source and line is not None else ""
        super().__init__(f"{where}{message}")


class RequestError(FescaleError):
    """One request cannot be served as asked (e.g. its prompt is longer than the model's context).

    Raised per prompt: the pipeline records it in the errors file and continues with the others.
    """


class BackendError(FescaleError):
    """A model backend failed (engine crash, endpoint down after all retries)."""
