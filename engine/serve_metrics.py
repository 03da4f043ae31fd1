"""The Serve app's Prometheus metrics, through Ray's metrics agent (scrape each node's metrics port).

Ray prefixes them `ray_`: `ray_fescale_requests_total`, `ray_fescale_request_latency_seconds`,
`ray_fescale_stage_latency_seconds`, `ray_fescale_tokens_total`, `ray_fescale_feedback_dropped_total`,
`ray_fescale_ongoing_requests`. Serve's own `ray_serve_*` metrics (queued requests per deployment,
HTTP latency) come on top.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from engine.rows import PromptState
from engine.summary import Summary

LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500]


class ServeMetrics:
    def __init__(self):
        self.requests = Counter("fescale_requests_total", "chat requests by mode and HTTP status", tag_keys=("mode", "status"))
        self.latency = Histogram("fescale_request_latency_seconds", "request latency", LATENCY_BOUNDARIES, tag_keys=("mode",))
        self.stage_latency = Histogram("fescale_stage_latency_seconds", "latency of one method stage", LATENCY_BOUNDARIES, tag_keys=("stage",))
        self.tokens = Counter("fescale_tokens_total", "tokens per stage", tag_keys=("stage", "kind"))
        self.dropped = Counter("fescale_feedback_dropped_total", "feedback dropped by the filter", tag_keys=("reason",))
        self.ongoing = Gauge("fescale_ongoing_requests", "requests this ingress replica is working on")

    def stage(self, name: str, seconds: float) -> None:
        self.stage_latency.observe(seconds, tags={"stage": name})

    def finished(self, mode: str, status: int, seconds: float, state: PromptState | None) -> None:
        self.requests.inc(tags={"mode": mode, "status": str(status)})
        self.latency.observe(seconds, tags={"mode": mode})
        if state is None:
            return
        summary = Summary(mode, state.config_hash)
        summary.add([state])
        for stage, usage in summary.tokens.items():
            for kind in ("prompt_tokens", "completion_tokens"):
                if usage[kind]:
                    self.tokens.inc(usage[kind], tags={"stage": stage, "kind": kind.removesuffix("_tokens")})
        for reason, count in (("perfectly", summary.feedback_perfect), ("unparseable", summary.feedback_unparseable)):
            if count:
                self.dropped.inc(count, tags={"reason": reason})
