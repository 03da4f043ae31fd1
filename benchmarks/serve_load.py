"""`fescale serve` under 200 concurrent clients: throughput, tail latency, backpressure, cancellation.

The model is a stub so that the numbers are the server's, not a model's: an OpenAI-compatible HTTP
endpoint on 127.0.0.1 (`benchmarks.http_stub`) that answers at once with the instant backend's
canned texts (`benchmarks.instant_backend`: feedback that survives the filter, plausible sizes) and
judge logprobs. The app runs in this process (as `fescale serve` would: a local Ray cluster, the
Serve proxy, the ingress, one role pool whose `openai` backend calls the stub).

Rows, all in one run:
- **raw stub**: the same greedy requests straight to the stub: what the backend alone sustains
  under the same client, so `fescale greedy ÷ raw` is fescale's own cost as a ratio;
- **fescale greedy** and **fescale feedback_edit** (the config's N=2, M=3, E=2, K=1: about
  14 stub calls per request): `--clients` clients each send `--requests` requests one after the other; a
  503 (Serve's backpressure: `serve.max_ongoing_requests` + `max_queued_requests` per ingress
  replica) is counted, not retried, and the client sends its next;
- **cancellation**: `--cancel-clients` clients send requests the stub holds for `--slow-s` seconds
  and disconnect after `--cancel-after-s`; the pool's `cancelled` count (GET /health with the API
  key) must grow by one per client, long before the stub would have answered;
- **mixed**: the clients at once, each request in turn greedy, feedback_edit, a hostile body
  (`HOSTILE`) or a slow one it leaves after 0.5 s: every answer must be a 200, 4xx, 503 or 504 (no
  other 5xx), none may hang (a request unanswered after 120 s counts as hanging), every left request's
  model calls must stop, and the replicas' memory (RSS of the pool and ingress processes) must not
  grow beyond noise.

    python -m benchmarks.serve_load            # 200 clients x 5 requests per mode
    python -m benchmarks.serve_load --quick    # 200 clients x 2 requests per mode
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from dataclasses import dataclass, field

import httpx

from benchmarks.http_stub import Answer, HttpStub
from benchmarks.instant_backend import TEXTS, TOKENS, prompt_tokens, request_kind
from benchmarks.record import record
from benchmarks.serve_latency import percentile

API_KEY = "serve-load-bench"
SLOW = "[slow]"  # a prompt with this tag is held by the stub for `slow_s`: the cancellation row's requests
PROMPT = "Explain what a leap year is in two sentences."


class StubEndpoint:
    """An OpenAI chat-completions endpoint that answers instantly (or after `slow_s` for a SLOW prompt)."""

    def __init__(self, slow_s: float):
        self.slow_s = slow_s
        self.calls = 0
        self.stub = HttpStub(self.handle)
        self.url = self.stub.url

    def handle(self, path: str, raw: bytes) -> Answer:
        body = json.loads(raw)
        self.calls += 1
        messages = tuple(body["messages"])
        if SLOW in messages[0]["content"]:
            time.sleep(self.slow_s)
        kind = request_kind(messages)
        n = body.get("n") or 1
        limit = body.get("max_tokens") or 256
        choice = {"index": 0, "message": {"role": "assistant", "content": TEXTS[kind]}, "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs"):  # the logit judge: one token, its top alternatives
            top = [{"token": "Yes", "logprob": -0.3, "bytes": None}, {"token": "No", "logprob": -1.4, "bytes": None}]
            choice = {**choice, "message": {"role": "assistant", "content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": -0.3, "bytes": None, "top_logprobs": top}]}}
        completion = min(TOKENS[kind], limit) * n
        data = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{**choice, "index": i} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens(messages), "completion_tokens": completion, "total_tokens": prompt_tokens(messages) + completion},
        }
        return 200, json.dumps(data).encode(), {}

    def close(self) -> None:
        self.stub.close()


@dataclass
class Outcome:
    """What the clients of one row saw."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the 200s
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)


async def load(url: str, body: dict, clients: int, requests: int, headers: dict[str, str]) -> Outcome:
    """`clients` concurrent clients, each sending `requests` POSTs of `body` one after the other."""
    out = Outcome()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(requests):
            started = time.perf_counter()
            try:
                status = (await http.post(url, json=body, headers=headers)).status_code
            except httpx.HTTPError:
                status = 0  # no HTTP answer at all (a reset or a timeout): its own column
            out.statuses[status] = out.statuses.get(status, 0) + 1
            if status == 200:
                out.latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        out.seconds = time.perf_counter() - started
    return out


async def pools_cancelled(base: str) -> int:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{base}/health", headers={"Authorization": f"Bearer {API_KEY}"})
    return sum(p["cancelled"] for p in r.json()["pools"].values())


async def cancellation(base: str, clients: int, after_s: float, wait_s: float) -> dict:
    """`clients` slow greedy requests abandoned after `after_s`; how many of their model calls the pool
    stopped, and how soon after the disconnect the count was complete."""
    before = await pools_cancelled(base)
    body = {"messages": [{"role": "user", "content": f"{PROMPT} {SLOW}"}], "fescale": {"mode": "greedy"}}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def abandon(http: httpx.AsyncClient) -> None:
        try:
            await asyncio.wait_for(http.post(f"{base}/v1/chat/completions", json=body, headers=headers), after_s)
        except asyncio.TimeoutError:
            pass  # the client gives up: its connection closes, Serve cancels the request

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as http:
        await asyncio.gather(*(abandon(http) for _ in range(clients)))
    left = time.perf_counter()
    stopped = 0
    while time.perf_counter() - left < wait_s:
        stopped = await pools_cancelled(base) - before
        if stopped >= clients:
            break
        await asyncio.sleep(0.25)
    return {"clients": clients, "cancelled": stopped, "seconds_to_stop": round(time.perf_counter() - left, 2)}


# Bodies a client may send by mistake or on purpose; each must get a 4xx before any work.
HOSTILE = [
    b'{"messages": [',
    b"[" * 5000,
    b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "fescale": {"num_responses": 100000}}',
    b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
]
MIXED = ("greedy", "feedback_edit", "hostile", "leaves")


async def mixed(base: str, clients: int, requests: int) -> dict:
    """`clients` clients at once, each sending `requests` requests of the four `MIXED` kinds in turn."""
    url, headers = f"{base}/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    before_cancelled = await pools_cancelled(base)
    before_rss = await server_rss(base)
    statuses: dict[str, int] = {}
    left = 0

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal left
        for j in range(requests):
            kind = MIXED[(k + j) % len(MIXED)]
            body = {"messages": [{"role": "user", "content": PROMPT + (f" {SLOW}" if kind == "leaves" else "")}], "fescale": {"mode": "feedback_edit" if kind == "feedback_edit" else "greedy"}}
            content = HOSTILE[(k + j) % len(HOSTILE)] if kind == "hostile" else json.dumps(body).encode()
            try:
                post = http.post(url, content=content, headers=headers, timeout=120)
                status = str((await (asyncio.wait_for(post, 0.5) if kind == "leaves" else post)).status_code)
            except asyncio.TimeoutError:
                status, left = "left", left + 1
            except httpx.TimeoutException:
                status = "hanging"
            except httpx.HTTPError:
                status = "no answer"
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    seconds = time.perf_counter() - started
    await asyncio.sleep(2.0)  # the last leavers' cancels reach their replica
    return {
        "sent": clients * requests, "seconds": round(seconds, 1), "statuses": statuses, "left": left,
        "cancelled": await pools_cancelled(base) - before_cancelled,
        "server_5xx": sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500 and k not in ("503", "504")),
        "rss_mb": (before_rss, await server_rss(base)),
    }


async def server_rss(base: str) -> float:
    """MB resident in the pools' model replicas and the Serve ingress and pools processes."""
    import psutil

    async with httpx.AsyncClient(timeout=30) as http:
        pools = (await http.get(f"{base}/health", headers={"Authorization": f"Bearer {API_KEY}"})).json()["pools"]
    pids = {pid for p in pools.values() for pid in p["pids"]}
    pids |= {p.pid for p in psutil.process_iter(["cmdline"]) if any(name in " ".join(p.info["cmdline"] or []) for name in ("FescaleAPI", "FescalePools"))}
    return round(sum(psutil.Process(pid).memory_info().rss for pid in pids if psutil.pid_exists(pid)) / 1e6, 1)


def start_server(stub_url: str, port: int, clients: int) -> None:
    """The app as `fescale serve --config feedback_edit` starts it, every role on the stub endpoint."""
    from engine.config import load_config
    from engine.runner import init_ray
    from engine.serve_app import run_app

    endpoint = {"base_url": stub_url, "max_concurrency": clients, "timeout_s": 600, "max_retries": 0}
    role = {"model": "stub", "backend": "openai", "endpoint": endpoint, "num_cpus": 0.5}
    overrides = [f"roles.generator={json.dumps(role)}", "serve.modes=[greedy,feedback_edit]", f"serve.api_keys=[{API_KEY}]", f"serve.port={port}", "serve.host=127.0.0.1"]
    cfg = load_config("feedback_edit", overrides)
    init_ray(cfg, serving=True)
    run_app(cfg)


def row(label: str, o: Outcome) -> dict:
    ok = o.latencies or [float("nan")]
    return {
        "label": label,
        "sent": sum(o.statuses.values()),
        "ok": o.count(200),
        "busy_503": o.count(503),
        "other": sum(v for k, v in o.statuses.items() if k not in (200, 503)),
        "seconds": round(o.seconds, 2),
        "ok_per_s": round(o.count(200) / o.seconds, 1),
        "p50_s": round(statistics.median(ok), 3),
        "p95_s": round(percentile(ok, 0.95), 3),
        "p99_s": round(percentile(ok, 0.99), 3),
        "statuses": o.statuses,  # `other` in detail: 0 is no HTTP answer at all
    }


def mixed_table(m: dict, clients: int) -> str:
    """The mixed row: what every answer was, whether any hung or failed with a 5xx of ours, memory."""
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(m["statuses"].items()))
    return "\n".join([
        f"| mixed, {clients} clients ({', '.join(MIXED)} in turn) | sent | answers | 5xx other than 503/504 | hanging | left, their calls stopped | server RSS before -> after |",
        "|---|---|---|---|---|---|---|",
        f"| {m['seconds']} s | {m['sent']} | {shown} | {m['server_5xx']} | {m['statuses'].get('hanging', 0)} | {m['left']}, {m['cancelled']} | {m['rss_mb'][0]} -> {m['rss_mb'][1]} MB |",
    ])


def table(rows: list[dict], cancel: dict, ratio: float, clients: int) -> str:
    lines = [
        f"| {clients} concurrent clients | requests sent | 200 | 503 (backpressure) | other | 200s per second | p50 | p95 | p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['sent']} | {r['ok']} | {r['busy_503']} | {r['other']} | {r['ok_per_s']} | {r['p50_s']} s | {r['p95_s']} s | {r['p99_s']} s |")
    lines.append(f"| **fescale greedy ÷ raw stub**, 200s per second | | | | | **{ratio}** | | | |")
    lines.append(
        f"| cancellation: {cancel['clients']} clients leave slow requests after {cancel['after_s']} s | {cancel['clients']} | | | | "
        f"pool `cancelled` +{cancel['cancelled']} within {cancel['seconds_to_stop']} s of leaving (stub holds them {cancel['slow_s']} s) | | | |"
    )
    return "\n".join(lines)


def run(clients: int, requests: int, cancel_clients: int, cancel_after_s: float, slow_s: float, port: int) -> dict:
    """Every row against one stub and one server; the rows, the cancellation result and the ratio."""
    stub = StubEndpoint(slow_s)
    try:
        start_server(stub.url, port, clients)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        greedy = {"model": "fescale", "messages": [{"role": "user", "content": PROMPT}], "fescale": {"mode": "greedy"}}
        raw = {"model": "stub", "messages": greedy["messages"], "max_tokens": 256, "temperature": 0.0}
        asyncio.run(load(f"{base}/v1/chat/completions", greedy, 4, 2, headers))  # warm-up, not counted
        asyncio.run(load(f"{base}/v1/chat/completions", {**greedy, "fescale": {"mode": "feedback_edit"}}, 2, 1, headers))
        rows = [
            row("raw stub endpoint, greedy body", asyncio.run(load(f"{stub.url}/chat/completions", raw, clients, requests, {}))),
            row("fescale greedy", asyncio.run(load(f"{base}/v1/chat/completions", greedy, clients, requests, headers))),
            row("fescale feedback_edit (N=2, M=3, E=2, K=1)", asyncio.run(load(f"{base}/v1/chat/completions", {**greedy, "fescale": {"mode": "feedback_edit"}}, clients, requests, headers))),
        ]
        cancel = {**asyncio.run(cancellation(base, cancel_clients, cancel_after_s, wait_s=min(slow_s, 60))), "after_s": cancel_after_s, "slow_s": slow_s}
        mix = asyncio.run(mixed(base, clients, max(requests, len(MIXED))))
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
        stub.close()
    ratio = round(rows[1]["ok_per_s"] / rows[0]["ok_per_s"], 3)
    return {"rows": rows, "cancel": cancel, "mixed": mix, "ratio": ratio, "stub_calls": stub.calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200, help="concurrent clients [200]")
    p.add_argument("--requests", type=int, default=5, help="requests per client and mode, one after the other [5]")
    p.add_argument("--quick", action="store_true", help="2 requests per client and mode")
    p.add_argument("--cancel-clients", type=int, default=20, help="clients that abandon slow requests [20]")
    p.add_argument("--cancel-after-s", type=float, default=2.0, help="when they disconnect [2]")
    p.add_argument("--slow-s", type=float, default=60.0, help="how long the stub holds a slow request [60]")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--output", default="benchmarks/results/serve_load", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)
    requests = 2 if args.quick else args.requests

    started = time.monotonic()
    result = run(args.clients, requests, args.cancel_clients, args.cancel_after_s, args.slow_s, args.port)
    note = (
        f"{time.monotonic() - started:.0f} s in all on 2 shared cores (clients, stub, Ray and Serve in one box); "
        f"{result['stub_calls']} stub calls. A 503 is counted and not retried; latencies are of the 200s."
    )
    record(args.output, "benchmarks.serve_load", argv, table(result["rows"], result["cancel"], result["ratio"], args.clients) + "\n\n" + mixed_table(result["mixed"], args.clients), note, result, "fescale_greedy_over_raw", result["ratio"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
