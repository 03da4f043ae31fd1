"""The Ray Serve app: an OpenAI-compatible front of the Feedback-Edit system, for live traffic.

Two deployments share the work. `FescalePools` (one replica) starts the role pools of every served
mode, the same `engine.pools.Pools` the batch engine uses, and hands out their picklable clients.
`FescaleAPI` (the FastAPI ingress; replicas or autoscaling from `serve:`) turns each chat request into
a per-request config (`engine.knobs`) and runs the same `engine.steps` as the batch pipeline against
those shared pools, so concurrent requests are batched together by the model replicas.

Backpressure is Serve's own: `serve.max_ongoing_requests` per ingress replica, then
`serve.max_queued_requests` waiting, then 503 with `Retry-After: serve.retry_after_s`.

`build_app` is the application builder a Serve config file names (`fescale serve --write-serve-config`).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.pools import PoolClients, Pools
from engine.config import FescaleConfig, build_config, load_config
from actors.errors import AuthError, ConfigError, NotFoundError
from engine.knobs import request_config
from engine.openai_protocol import ChatCompletionRequest, Completion, error_response, parse_request
from engine.rows import Message, PromptState
from engine.serve_metrics import ServeMetrics
from engine.steps import build_steps, run_steps

log = logging.getLogger("fescale")
APP_NAME = "fescale"

api = FastAPI(title="fescale", description="OpenAI-compatible Feedback-Edit inference-time scaling")


def _error(error: Exception) -> JSONResponse:
    """The error's response (`error_response`); a 5xx is logged here with its request id.

    Defined above the deployments: `serve.ingress` pickles the routes when the class is defined, and
    a name the module defines later would be missing in the replica."""
    request_id = uuid.uuid4().hex
    status, body = error_response(error, request_id)
    if status >= 500:
        log.error("request %s failed: %s", request_id, error, exc_info=error)
    return JSONResponse(body, status_code=status)


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

    def __init__(self, pools: DeploymentHandle, config: dict[str, Any]):
        self.cfg = build_config(config, "serve app config")
        self.pools = pools
        self._clients: PoolClients | None = None
        env_keys = os.environ.get(self.cfg.serve.api_keys_env, "")
        self.api_keys = [k for k in [*self.cfg.serve.api_keys, *env_keys.split(",")] if k.strip()]
        self.metrics = ServeMetrics()
        self.ongoing = 0

    async def clients(self) -> PoolClients:
        if self._clients is None:
            self._clients = await self.pools.clients.remote()
        return self._clients

    def authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in self.api_keys):
            raise AuthError("missing or invalid API key: send `Authorization: Bearer <key>`")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 "ok"; 503 "degraded" while a model replica is down (restarting), with per-pool counts."""
        pools = await self.pools.status.remote()
        degraded = any(p["ready"] < p["replicas"] for p in pools.values())
        return JSONResponse({"status": "degraded" if degraded else "ok", "pools": pools}, status_code=503 if degraded else 200)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self.authorize(request)
        except AuthError as e:
            return _error(e)
        model = {"id": self.cfg.serve.model_name, "object": "model", "created": 0, "owned_by": "fescale"}
        return JSONResponse({"object": "list", "data": [model]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        mode, state, status = self.cfg.mode, None, 200
        self.ongoing += 1
        self.metrics.ongoing.set(self.ongoing)
        try:
            self.authorize(request)
            req = parse_request(await request.body())
            if req.model not in (None, self.cfg.serve.model_name):
                raise NotFoundError(f"model {req.model!r} does not exist; this server serves {self.cfg.serve.model_name!r}")
            state = await self.answer(req)
            mode = state.mode
            completion = Completion(self.cfg.serve.model_name, state, req.fescale.return_trace)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(iter(completion.chunks(include_usage)), media_type="text/event-stream")
            return JSONResponse(completion.body())
        except Exception as e:  # any failure fails this request only
            response = _error(e)
            status = response.status_code
            return response
        finally:
            self.ongoing -= 1
            self.metrics.ongoing.set(self.ongoing)
            self.metrics.finished(mode, status, time.perf_counter() - started, state if status == 200 else None)

    async def answer(self, req: ChatCompletionRequest) -> PromptState:
        """Run the request's config through the method steps on the shared pools."""
        cfg = request_config(self.cfg, req)
        steps = build_steps(cfg, (await self.clients()).for_config(cfg))
        state = PromptState(
            id=uuid.uuid4().hex, messages=[Message(**m) for m in req.conversation()], mode=cfg.mode, config_hash=cfg.config_hash()
        )
        return await run_steps(steps, state, on_step=self.metrics.stage)


def fescale_app(cfg: FescaleConfig) -> serve.Application:
    """The bound application of a config: the pools deployment and the ingress over it."""
    data = cfg.model_dump(mode="json")
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
    return FescaleAPI.options(**options).bind(pools, data)


def run_app(cfg: FescaleConfig) -> str:
    """Start Serve's HTTP proxy on `serve.host:serve.port` and deploy the app (returns once it is
    ready, or raises Serve's RuntimeError naming the replica that failed); the base URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(fescale_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def serve_config_file(cfg: FescaleConfig) -> str:
    """A Serve config file (YAML) for `serve run` / `serve deploy`, carrying the resolved config inline.

    The file needs fescale importable where the replicas run (installed, or a `runtime_env` you add).
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
                "args": {"config": cfg.model_dump(mode="json", exclude_defaults=True)},
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
