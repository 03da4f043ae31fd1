"""The one error hierarchy and its one HTTP mapping: every error class knows its status, OpenAI type
and code; a crashed replica or an internal fault is a 5xx, a client's mistake a 4xx; an unexpected
exception never shows its message to the client."""

from __future__ import annotations

import pytest
import ray

from actors.errors import (
    AuthError,
    BackendError,
    ConfigError,
    ContextLengthError,
    FescaleError,
    InputError,
    NotFoundError,
    PromptCrashError,
    PromptError,
    RequestError,
    RequestTooLargeError,
    last_line,
    unwrap_ray_error,
)
from engine.openai_protocol import error_response


@pytest.mark.parametrize(
    "error, status, kind, code",
    [
        (RequestError("fescale.num_responses: must be > 0", param="fescale.num_responses"), 400, "invalid_request_error", "invalid_request"),
        (RequestError("request body is not valid JSON", code="invalid_json"), 400, "invalid_request_error", "invalid_json"),
        (RequestTooLargeError("request body is over 1048576 bytes"), 413, "invalid_request_error", "request_too_large"),
        (ContextLengthError("prompt is 2000 tokens, the model's context is 1024"), 400, "invalid_request_error", "context_length_exceeded"),
        (InputError("not valid JSON", source="in.jsonl", line=3), 400, "invalid_request_error", "invalid_input"),
        (AuthError("missing or invalid API key"), 401, "authentication_error", "invalid_api_key"),
        (NotFoundError("model 'x' does not exist", param="model", code="model_not_found"), 404, "not_found_error", "model_not_found"),
        (PromptCrashError("a replica died 3 times running this prompt's call alone"), 500, "server_error", "replica_crashed"),
        (BackendError("endpoint down after 3 attempts"), 500, "server_error", "backend_error"),
        (ConfigError("invalid config"), 500, "server_error", "invalid_config"),
    ],
)
def test_each_error_class_maps_to_its_own_status_type_and_code(error, status, kind, code):
    got_status, body = error_response(error, "req-1")
    assert got_status == status
    message = str(error) if status < 500 else "internal error (request id req-1)"  # a 500's detail stays in the server log
    assert body == {"error": {"message": message, "type": kind, "param": getattr(error, "param", None), "code": code}}


def test_the_mapping_never_reads_the_message():
    """A backend error whose text mentions the context is still a 5xx (the old code matched on "context")."""
    assert error_response(BackendError("engine died while checking the context length"), "r")[0] == 500
    assert error_response(ContextLengthError("too long"), "r")[1]["error"]["code"] == "context_length_exceeded"


def test_an_unexpected_exception_is_an_internal_error_that_hides_its_detail():
    status, body = error_response(KeyError("/secret/path/to/weights"), "req-42")
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert "secret" not in body["error"]["message"] and "req-42" in body["error"]["message"]


def test_prompt_errors_are_the_ones_a_batch_job_records_and_goes_on_from():
    assert issubclass(RequestError, PromptError) and issubclass(PromptCrashError, PromptError)
    assert not issubclass(BackendError, PromptError) and not issubclass(ConfigError, PromptError)
    assert all(issubclass(c, FescaleError) for c in (InputError, AuthError, NotFoundError, BackendError, ConfigError))


def test_unwrap_finds_fescale_errors_inside_rays_wrapping_and_chains():
    own = PromptCrashError("crashed")
    wrapped = ray.exceptions.RayTaskError("call", "Traceback ...\nPromptCrashError: crashed", own)
    assert unwrap_ray_error(wrapped) is own
    try:
        try:
            raise own
        except PromptCrashError as e:
            raise RuntimeError("Ray Data wrapper") from e
    except RuntimeError as outer:
        assert unwrap_ray_error(outer) is own
    assert unwrap_ray_error(ValueError("plain")) is None
    assert last_line(RuntimeError("Traceback (most recent call last):\n  File x\nValueError: the cause\n")) == "ValueError: the cause"
