"""The Ray Serve app: an OpenAI-compatible front of the Feedback-Edit system, for live traffic.

Two deployments share the work. `FescalePools` (one replica) starts the role pools of every served
mode, the same `engine.pools.Pools` the batch engine uses, and hands out their picklable clients.
`FescaleAPI` (the FastAPI ingress; replicas or autoscaling from `serve:`) turns each chat request into
a per-request config (`engine.knobs`) and runs the same `engine.steps` as the batch pipeline against
those shared pools, so concurrent requests are batched together by the model replicas.

Backpressure is Serve's own: `serve.max_ongoing_requests` per ingress replica, then
`serve.max_queued_requests` waiting, then 503 with `Retry-After: serve.retry_after_s`.

Hostile input is refused before any work (`serve.max_request_bytes`, `max_messages`, `max_json_depth`,
64-bit integers, text UTF-8 can hold, `serve.caps` on every knob and on the model calls in all), and
auth fails closed: the API keys are resolved where the app is built (the `fescale serve` process, or
Serve's application builder), handed to the ingress, and never written into a config; an app on a
non-loopback host without keys is refused unless `serve.allow_unauthenticated` says so.

`build_app` is the application builder a Serve config file names (`fescale serve --write-serve-config`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from engine.pools import PoolClients, Pools
from engine.config import FescaleConfig, build_config, load_config
from actors.errors import AuthError, BackendError, ConfigError, DeadlineError, NotFoundError, RequestTooLargeError
from engine.knobs import deadline_s, request_config, served_models, with_preset
from engine.openai_protocol import ChatCompletionRequest, Completion, error_response, parse_request
from engine.rows import Message, PromptState
from engine.serve_metrics import ServeMetrics
from engine.steps import build_steps, each_step

log = logging.getLogger("fescale")
APP_NAME = "fescale"

# FastAPI's own /docs, /redoc and /openapi.json are off: the app serves its schema only when
# `serve.openapi` is on (the routes below), so a public server does not describe itself to anyone.
api = FastAPI(
    title="fescale", description="OpenAI-compatible Feedback-Edit inference-time scaling", docs_url=None, redoc_url=None, openapi_url=None
)


def _error(error: Exception) -> JSONResponse:
    """The error's response (`error_response`); a 5xx is logged here with its request id.

    This and the helpers below are defined above the deployments: `serve.ingress` pickles the routes
    when the class is defined, and a name the module defines later would be missing in the replica."""
    request_id = uuid.uuid4().hex
    status, body = error_response(error, request_id)
    if status >= 500:
        log.error("request %s failed: %s", request_id, error, exc_info=error)
    return JSONResponse(body, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is over `limit` bytes: by its Content-Length, or
    while it streams in, so an oversized body is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"request body is {int(declared)} bytes; this server takes at most {limit} (serve.max_request_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"request body is over {limit} bytes (serve.max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def api_keys(cfg: FescaleConfig) -> list[str]:
    """The keys the app accepts: `serve.api_keys` and the comma-separated `serve.api_keys_env` of this
    process's environment (where the app is built, not where its replicas happen to run)."""
    from_env = os.environ.get(cfg.serve.api_keys_env, "").split(",")
    return [k.strip() for k in [*(key.get_secret_value() for key in cfg.serve.api_keys), *from_env] if k.strip()]


def check_exposure(cfg: FescaleConfig, keys: list[str]) -> None:
    """Fail closed: no keys on a host other clients can reach is refused unless explicitly allowed."""
    host = cfg.serve.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not keys and not loopback and not cfg.serve.allow_unauthenticated:
        raise ConfigError(
            f"serve.host={host} takes connections from other machines, and no API key is set: set {cfg.serve.api_keys_env} "
            "(comma-separated keys) or serve.api_keys, or serve.allow_unauthenticated=true to serve without auth on purpose"
        )


@serve.deployment(name="FescalePools", num_replicas=1, ray_actor_options={"num_cpus": 0})
class FescalePools:
    """Owns the role pools (model replicas on placement groups) for the app's lifetime."""

    def __init__(self, config: dict[str, Any]):
        cfg = build_config(config, "serve app config")
        self.pools = Pools(cfg, cfg.served_modes())
        self.pools.start()

    def clients(self) -> PoolClients:
        return self.pools.clients()

    async def status(self) -> dict[str, dict[str, int]]:
        return await self.pools.health()

    def __del__(self):
        self.pools.shutdown()


@serve.deployment(name="FescaleAPI")
@serve.ingress(api)
class FescaleAPI:
    """The HTTP routes: /v1/chat/completions, /v1/models, /health."""

    def __init__(self, pools: DeploymentHandle, config: dict[str, Any], api_keys: list[str]):
        self.cfg = build_config(config, "serve app config")
        check_exposure(self.cfg, api_keys)  # also here: a deployment made without `fescale_app` fails closed too
        self.pools = pools
        self._clients: PoolClients | None = None
        self.api_keys = api_keys
        self.metrics = ServeMetrics()
        self.ongoing = 0

    async def clients(self) -> PoolClients:
        if self._clients is None:
            self._clients = await self.pools.clients.remote()
        return self._clients

    def authorize(self, request: Request) -> None:
        if not self.authorized(request):
            raise AuthError("missing or invalid API key: send `Authorization: Bearer <key>`")

    def authorized(self, request: Request) -> bool:
        if not self.api_keys:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token, k.encode()) for k in self.api_keys)

    @api.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        """200 "ok"; 503 "degraded" while a model replica is down (restarting). Per-pool counts and
        process ids only for a caller with a valid key: a load balancer needs no more than the status."""
        pools = await self.pools.status.remote()
        degraded = any(p["ready"] < p["replicas"] for p in pools.values())
        body: dict[str, Any] = {"status": "degraded" if degraded else "ok"}
        if self.authorized(request):
            body["pools"] = pools
        return JSONResponse(body, status_code=503 if degraded else 200)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        if not self.cfg.serve.openapi:
            return _error(NotFoundError("not found (the API schema is off; serve.openapi: true serves it)"))
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        if not self.cfg.serve.openapi:
            return _error(NotFoundError("not found (the API docs are off; serve.openapi: true serves them)"))
        return get_swagger_ui_html(openapi_url="/openapi.json", title="fescale")

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self.authorize(request)
        except AuthError as e:
            return _error(e)
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "fescale"} for name in served_models(self.cfg.serve)]
        return JSONResponse({"object": "list", "data": models})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """One answer. A client that disconnects, or a request past its deadline (504), cancels the
        request's model calls on every pool (`actors.client.PoolClient`): nobody would read them."""
        started = time.perf_counter()
        self._begin()
        try:
            self.authorize(request)
            s = self.cfg.serve
            req = parse_request(await read_body(request, s.max_request_bytes), s.max_json_depth, s.max_messages, request.headers)
            req = with_preset(s, req)  # a model id of serve.model_presets: its knobs; an unknown one: 404
            cfg, deadline = request_config(self.cfg, req), deadline_s(self.cfg, req)
        except Exception as e:  # any failure fails this request only
            response = _error(e)
            self._end(self.cfg.mode, response.status_code, started, None)
            return response
        except asyncio.CancelledError:  # the client left while its body was read
            self._end(self.cfg.mode, 499, started, None)
            raise
        completion = Completion(req.model or s.model_name, req.fescale.return_trace, req.n)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(completion, cfg, req, deadline, include_usage, started), media_type="text/event-stream")
        status, state = 499, self._state(cfg, req)  # 499: the client went away (nginx's code); the metric's status only
        try:
            async for _ in self._steps(cfg, state, deadline):
                pass
            status = 200
            return JSONResponse(completion.body(state))
        except Exception as e:
            response = _error(e)
            status = response.status_code
            return response
        finally:
            self._end(cfg.mode, status, started, state if status == 200 else None)

    async def _stream(self, completion: Completion, cfg: FescaleConfig, req: ChatCompletionRequest, deadline: float, include_usage: bool, started: float):
        status, state = 499, self._state(cfg, req)
        try:
            yield completion.opening()
            streamed = 0
            async for event in self._steps(cfg, state, deadline, text=True):
                if isinstance(event, str):  # the answer's tokens, as generated (greedy)
                    streamed += len(event)
                    yield completion.delta(event)
                else:
                    yield Completion.progress(*event)
            for event in completion.closing(state, include_usage, streamed):
                yield event
            status = 200
        except Exception as e:
            response = _error(e)
            status = response.status_code
            for event in completion.failed(json.loads(response.body)):
                yield event
        finally:
            self._end(cfg.mode, status, started, state if status == 200 else None)

    @staticmethod
    def _state(cfg: FescaleConfig, req: ChatCompletionRequest) -> PromptState:
        messages = [Message(**m) for m in req.conversation()]
        # A seeded request's id is its seed: the method's own random choices are keyed by it (`method.row_rng`).
        row_id = uuid.uuid4().hex if req.seed is None else f"seed-{req.seed}"
        return PromptState(id=row_id, messages=messages, mode=cfg.mode, config_hash=cfg.config_hash())

    async def _steps(self, cfg: FescaleConfig, state: PromptState, deadline: float, text: bool = False):
        """Run the request's config through the method steps on the shared pools, yielding (step,
        seconds) as each finishes, and with `text` the answer's deltas of a greedy request
        (`engine.steps.each_step`). Each event is awaited with what is left of the deadline: when it
        runs out, the step's task is cancelled, and with it the model calls it was waiting for."""
        steps = each_step(build_steps(cfg, (await self.clients()).for_config(cfg)), state, text)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            try:
                event = await asyncio.wait_for(anext(steps), end - loop.time())
            except StopAsyncIteration:
                return
            except (BackendError, RayActorError):
                # A pool is gone (out of restarts, or the pools deployment died and Serve started a
                # new one with new pools): the next request asks the pools deployment for its clients.
                self._clients = None
                raise
            except TimeoutError:
                raise DeadlineError(
                    f"no answer within the request's deadline of {deadline:g}s (fescale.deadline_s, default serve.deadline_s); "
                    "its model calls were cancelled"
                ) from None
            if not isinstance(event, str):
                self.metrics.stage(*event)
            yield event

    def _begin(self) -> None:
        self.ongoing += 1
        self.metrics.ongoing.set(self.ongoing)

    def _end(self, mode: str, status: int, started: float, state: PromptState | None) -> None:
        self.ongoing -= 1
        self.metrics.ongoing.set(self.ongoing)
        self.metrics.finished(mode, status, time.perf_counter() - started, state)


def fescale_app(cfg: FescaleConfig) -> serve.Application:
    """The bound application of a config: the pools deployment and the ingress over it. The keys are
    resolved here and handed to the ingress apart from the config, which carries none."""
    keys = api_keys(cfg)
    check_exposure(cfg, keys)
    data = cfg.model_dump(mode="json", exclude={"serve": {"api_keys"}})
    s = cfg.serve
    pools = FescalePools.bind(data)
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"retry_after_s": s.retry_after_s},
        "ray_actor_options": {"num_cpus": s.num_cpus},
    }
    if s.autoscaling:
        options["autoscaling_config"] = s.autoscaling
    else:
        options["num_replicas"] = s.num_replicas
    return FescaleAPI.options(**options).bind(pools, data, keys)


def run_app(cfg: FescaleConfig) -> str:
    """Start Serve's HTTP proxy on `serve.host:serve.port` and deploy the app (returns once it is
    ready, or raises Serve's RuntimeError naming the replica that failed); the base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(fescale_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def serve_config_file(cfg: FescaleConfig) -> str:
    """A Serve config file (YAML) for `serve run` / `serve deploy`, carrying the resolved config inline.

    The file needs fescale importable where the replicas run (installed, or a `runtime_env` you add).
    API keys are never written: the builder reads `serve.api_keys_env` where it runs.
    """
    import yaml

    data = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "engine.serve_app:build_app",
                "args": {"config": cfg.model_dump(mode="json", exclude_defaults=True, exclude={"serve": {"api_keys"}})},
            }
        ],
    }
    header = f"# fescale Serve config (mode {cfg.mode}, config {cfg.config_hash()}): serve run THIS_FILE, or serve deploy THIS_FILE\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=100)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files: `args: {config: <preset, path or inline mapping>, overrides: [...]}`."""
    config, overrides = args.get("config", "feedback_edit"), args.get("overrides") or []
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown Serve app args {sorted(unknown)}; valid: config, overrides")
    return fescale_app(load_config(config, overrides))
