"""The `serve:` section of the config: the Ray Serve app's HTTP, backpressure, auth, limits and caps.

Its own module because the Serve app's surface has grown its own set of keys (README "Serving");
`engine.config.FescaleConfig` holds it as `serve`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator

from engine.config_kit import StrictModel
from engine.modes import ModeName


class ServeCaps(StrictModel):
    """Per-request limits of the Serve app; a request above one gets a 400 that names it.

    They bound how much work one request can make the models do (N x M x K calls of up to
    max_tokens each), so a single client cannot monopolise the pools. The server's own defaults
    are the operator's choice and are not capped: a value equal to the server's default passes
    even when that default is above the cap, so an operator can serve a large default while
    refusing requests that set their own value above the cap.
    """

    max_responses: PositiveInt = Field(16, description="N, initial responses per request")
    max_feedback_samples: PositiveInt = Field(64, description="M, feedback sampled per response")
    max_feedback_per_request: PositiveInt = Field(256, description="N x M, all feedback of one request")
    max_edits_per_set: PositiveInt = Field(4, description="K, edits per feedback set")
    max_tokens: PositiveInt = Field(4096, description="the generator's max_tokens")
    max_model_calls: PositiveInt = Field(
        1024, description="responses + feedback + edits + scorings one request may cause (engine.knobs.model_calls): the knobs' product"
    )
    max_deadline_s: PositiveFloat = Field(3600.0, description="fescale.deadline_s a request may ask for")


class ServeConfig(StrictModel):
    """The Ray Serve app (`fescale serve`): HTTP, backpressure, replicas, auth and per-request caps."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = Field("fescale", description="the model id clients send and GET /v1/models lists")
    modes: list[ModeName] | None = Field(None, description="modes a request may ask for; null: all (their role pools are loaded at start)")
    num_replicas: PositiveInt = Field(1, description="HTTP ingress replicas (they share the role pools)")
    autoscaling: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config of the ingress; replaces num_replicas")
    max_ongoing_requests: PositiveInt = Field(32, description="requests one ingress replica works on at once")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting for an ingress replica; beyond: 503 (-1: unbounded)")
    retry_after_s: NonNegativeFloat = Field(5.0, description="Retry-After of a 503 over the queue limit")
    num_cpus: NonNegativeFloat = Field(0.1, description="logical CPUs reserved per ingress replica (it only awaits the pools)")
    api_keys: list[SecretStr] = Field(default_factory=list, description="bearer tokens accepted (never printed or written back)")
    api_keys_env: str = Field("FESCALE_API_KEYS", description="environment variable with more comma-separated keys, read where the app is built")
    allow_unauthenticated: bool = Field(False, description="serve a non-loopback host without API keys, on purpose")
    openapi: bool = Field(False, description="serve /openapi.json and /docs (off: a public server does not describe itself)")
    max_request_bytes: PositiveInt = Field(1 << 20, description="request body limit; larger: 413 before it is read whole")
    max_messages: PositiveInt = Field(512, description="messages per request")
    max_json_depth: PositiveInt = Field(32, description="nesting of the request's JSON")
    deadline_s: PositiveFloat = Field(
        600.0, description="a request still unanswered after this long gets a 504 and its model calls are cancelled (per request: fescale.deadline_s)"
    )
    caps: ServeCaps = Field(default_factory=ServeCaps)
    model_presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="more model ids, each with default `fescale` knobs (a request's own win), e.g. fescale-greedy: {mode: greedy}"
    )

    @model_validator(mode="after")
    def _check_presets(self) -> "ServeConfig":
        from engine.openai_protocol import knobs_problem  # the request's own knob schema (that module sits above this one)

        for name, knobs in self.model_presets.items():
            if not name.strip() or name == self.model_name:
                raise ValueError(f"model_presets: {name!r} is not a new model id (serve.model_name's defaults are the config itself)")
            if problem := knobs_problem(knobs, self.modes):
                raise ValueError(f"model_presets.{name}.{problem}")
        return self

    @field_validator("api_keys")
    @classmethod
    def _not_masked(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(set(k.get_secret_value()) <= {"*"} for k in keys):
            raise ValueError("a key of only '*' is the mask of a printed config, not a key: set the real key (or FESCALE_API_KEYS)")
        return keys
