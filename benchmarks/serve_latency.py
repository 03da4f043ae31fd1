"""Latency of greedy vs inference-time-scaling (ITS) requests against the same Serve app, in one run.

Each prompt is sent once as a greedy request (`fescale.mode: greedy`) and once in the server's
ITS mode, interleaved, `--concurrency` at a time; the table gives p50/p95 latency and tokens per
request of each kind, and the ratios ITS / greedy. When the latency ratio is well below the token
ratio, the fan-out inside a request (N responses in one call, all feedback at once, all edits at
once) runs in parallel instead of one call after another.

A third request per prompt is the greedy one streamed: its time to the first piece of the answer
(TTFT: greedy streams the generator's tokens as they are decoded) against its time to the end.

    python -m benchmarks.serve_latency                          # starts the app on the embedded model
    python -m benchmarks.serve_latency --url http://host:8000   # against a running `fescale serve`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from benchmarks.record import record
from benchmarks.workload import DEMO_PROMPTS
from engine.inputs import read_prompts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, messages: list[list[dict]], knobs: dict, api_key: str | None, concurrency: int) -> list[dict]:
    """Send both kinds for every prompt; one record (kind, seconds, tokens) per request."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    kinds = {"greedy": {"mode": "greedy"}, "its": knobs}

    async def streamed(client: httpx.AsyncClient, conv: list[dict]) -> dict:
        async with gate:
            started, first = time.perf_counter(), None
            body = {"messages": conv, "stream": True, "stream_options": {"include_usage": True}, "fescale": {"mode": "greedy"}}
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = time.perf_counter() - started
                    if '"usage": {' in line:
                        usage = json.loads(line.removeprefix("data: "))["usage"]
            seconds = time.perf_counter() - started
        return {"kind": "streamed", "seconds": seconds, "ttft": first, "tokens": usage["total_tokens"], "completion_tokens": usage["completion_tokens"]}

    async def one(client: httpx.AsyncClient, kind: str, conv: list[dict]) -> dict:
        async with gate:
            started = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json={"messages": conv, "fescale": kinds[kind]}, headers=headers)
            seconds = time.perf_counter() - started
        r.raise_for_status()
        usage = r.json()["usage"]
        return {"kind": kind, "seconds": seconds, "tokens": usage["total_tokens"], "completion_tokens": usage["completion_tokens"]}

    async with httpx.AsyncClient(timeout=3600) as client:
        jobs = [job for conv in messages for job in (one(client, "greedy", conv), one(client, "its", conv), streamed(client, conv))]
        return await asyncio.gather(*jobs)


def report(records: list[dict], its_label: str) -> tuple[str, dict]:
    stats = {}
    for kind in ("greedy", "its"):
        rows = [r for r in records if r["kind"] == kind]
        secs = [r["seconds"] for r in rows]
        stats[kind] = {
            "requests": len(rows),
            "p50_s": round(statistics.median(secs), 2),
            "p95_s": round(percentile(secs, 0.95), 2),
            "tokens": round(statistics.mean(r["tokens"] for r in rows)),
            "completion_tokens": round(statistics.mean(r["completion_tokens"] for r in rows)),
        }
    streams = [r for r in records if r["kind"] == "streamed"]
    ttft = [r["ttft"] for r in streams if r["ttft"] is not None]
    stats["streamed"] = {"requests": len(streams), "ttft_p50_s": round(statistics.median(ttft), 2), "p50_s": round(statistics.median(r["seconds"] for r in streams), 2)}
    g, i, st = stats["greedy"], stats["its"], stats["streamed"]
    ratio = {k: round(i[k] / g[k], 1) for k in ("p50_s", "p95_s", "tokens", "completion_tokens")}
    lines = [
        "| requests | n | p50 latency | p95 latency | tokens / request (all stages) | generated tokens / request |",
        "|---|---|---|---|---|---|",
        f"| greedy | {g['requests']} | {g['p50_s']} s | {g['p95_s']} s | {g['tokens']} | {g['completion_tokens']} |",
        f"| {its_label} | {i['requests']} | {i['p50_s']} s | {i['p95_s']} s | {i['tokens']} | {i['completion_tokens']} |",
        f"| **ITS / greedy** | | **{ratio['p50_s']}x** | **{ratio['p95_s']}x** | **{ratio['tokens']}x** | **{ratio['completion_tokens']}x** |",
        "",
        "| greedy, streamed | n | time to first token p50 | time to the end p50 | first / end |",
        "|---|---|---|---|---|",
        f"| | {st['requests']} | {st['ttft_p50_s']} s | {st['p50_s']} s | {round(st['ttft_p50_s'] / st['p50_s'], 2)} |",
    ]
    return "\n".join(lines), {"stats": stats, "ratio": ratio}


def start_server(config: str, overrides: list[str], port: int):
    from engine.config import load_config
    from engine.runner import init_ray
    from engine.serve_app import run_app

    cfg = load_config(config, [*overrides, f"serve.port={port}", "serve.host=127.0.0.1"])
    init_ray(cfg, serving=True)
    run_app(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start one in-process from --config)")
    p.add_argument("--config", default="feedback_edit", help="config of the in-process server [feedback_edit]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--input", default=str(DEMO_PROMPTS), help="prompt file [the bundled demo prompts]")
    p.add_argument("--repeats", type=int, default=2, help="times each prompt is sent of each kind [2]")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight [1: latency without queueing]")
    p.add_argument("--knobs", default="{}", help='JSON `fescale` knobs of the ITS requests, e.g. \'{"num_responses": 4}\'')
    p.add_argument("--api-key")
    p.add_argument("--output", default="benchmarks/results/serve_latency", help="results prefix: .md (appended) and .json [benchmarks/results/serve_latency]")
    args = p.parse_args(argv)

    prompts, _ = read_prompts(args.input)
    messages = [p.messages for p in prompts] * args.repeats
    knobs = json.loads(args.knobs)
    url = args.url
    label = f"ITS ({knobs.get('mode', 'server default mode')})"
    if url is None:
        from engine.knobs import request_config
        from engine.openai_protocol import ChatCompletionRequest

        cfg = start_server(args.config, args.set, args.port)
        its = request_config(cfg, ChatCompletionRequest(messages=messages[0], fescale=knobs))
        label = f"ITS {its.mode}: N={its.generate.num_responses}, M={its.feedback.samples}, E={its.feedback.effective}, K={its.edit.edits_per_set}"
        url = f"http://127.0.0.1:{args.port}"
    asyncio.run(measure(url, messages[:1], knobs, args.api_key, 1))  # warm-up, not counted
    started = time.monotonic()
    records = asyncio.run(measure(url, messages, knobs, args.api_key, args.concurrency))
    table, summary = report(records, label)
    note = f"{len(records)} requests in {time.monotonic() - started:.0f}s, concurrency {args.concurrency}"
    data = {"label": label, "concurrency": args.concurrency, **summary, "records": records}
    record(args.output, "benchmarks.serve_latency", argv, table, note, data, "its_over_greedy_p50", summary["ratio"]["p50_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
