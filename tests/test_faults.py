"""Real faults on a local Ray cluster: a model replica's process is SIGKILLed mid-run, and a poison
prompt crashes its replica every time (`benchmarks.faults.FaultyBackend` wraps the HF backend and calls
`os._exit(1)` on a marked prompt: installed from the role's config, no hook in production code).
Every prompt must end up exactly once: in the output, or with its reason in the errors file."""

from __future__ import annotations

import json
import os
import signal

import pytest

from benchmarks.faults import faulty_role
from conftest import make_config

pytestmark = pytest.mark.slow


def prompts(n: int, poison_at: int | None = None):
    from engine.inputs import Prompt

    texts = [f"Question number {i}: what is {i} + {i}?" for i in range(n)]
    if poison_at is not None:
        texts[poison_at] = "POISON: this prompt crashes the model replica"
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": t}], line=i + 1) for i, t in enumerate(texts)]


def run(cfg, items, out, on_rows=None, before=None):
    """`on_rows(pids)` makes the callback for each batch of finished rows; `before(pids)` runs first."""
    from engine.pools import Pools
    from engine.runner import execute
    from engine.sinks import JsonlSink
    from engine.summary import Summary

    summary = Summary(cfg.mode, cfg.config_hash())
    with Pools(cfg) as pools:
        pids = [pid for group in pools.replicas.values() for pid in _pids(group)]
        if before:
            before(pids)
        execute(cfg, items, JsonlSink(out, []), summary, pools=pools, progress=False, on_rows=on_rows(pids) if on_rows else None)
    rows = [json.loads(line) for line in open(out)]
    errors = [json.loads(line) for line in open(out.with_suffix(".errors.jsonl"))]
    return summary, rows, errors


def _pids(replicas):
    import ray

    return [ray.get(r.ready.remote())["pid"] for r in replicas]


def test_a_replica_killed_mid_run_is_restarted_and_every_prompt_is_written_once(ray_session, tiny_model, tmp_path):
    """One batch in flight at a time: the first rows come back while later batches still need the
    replica (with every prompt in flight at once, the pool merges their calls and they all finish
    together, so a kill after the first rows would find nothing left to do)."""
    cfg = make_config(tiny_model, generate={"num_responses": 2, "max_tokens": 16}, pipeline={"batch_size": 2, "max_concurrent_batches": 1, "stage_actors": 1, "ready_timeout_s": 300})
    killed = []

    def kill_after_first_rows(pids):
        def on_rows(rows):
            if not killed:  # later prompts still need the replica
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        return on_rows

    summary, rows, errors = run(cfg, prompts(16), tmp_path / "out.jsonl", kill_after_first_rows)
    assert killed
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(16))  # each once, none lost
    assert errors == [] and summary.failed == 0
    assert summary.replica_restarts == 1 and summary.retries >= 1


def test_a_poison_prompt_fails_alone_into_the_errors_file(ray_session, tiny_model, tmp_path):
    cfg = make_config(
        tiny_model,
        roles={"generator": faulty_role({"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1}, crash_on="POISON")},
        pipeline={"batch_size": 2, "max_attempts": 2, "ready_timeout_s": 300},
    )
    summary, rows, errors = run(cfg, prompts(8, poison_at=3), tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(8) if i != 3)
    assert [(e["id"], e["stage"]) for e in errors] == [("p3", "generate")]
    assert "2 times running this prompt's call alone" in errors[0]["error"] and "pipeline.max_attempts=2" in errors[0]["error"]
    assert summary.failed == 1 and summary.prompts == 7
    assert summary.replica_restarts >= 2  # at least once per attempt of the poison prompt


def test_a_prompt_that_hangs_its_replica_times_out_alone(ray_session, tiny_model, tmp_path):
    cfg = make_config(
        tiny_model,
        mode="greedy",
        roles={"generator": faulty_role({"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1}, hang_on="HANG")},
        pipeline={"batch_size": 2, "max_attempts": 2, "call_timeout_s": 5, "ready_timeout_s": 300},
    )
    items = prompts(6)
    items[2].messages[0]["content"] = "HANG: this prompt never gets an answer"
    summary, rows, errors = run(cfg, items, tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == ["p0", "p1", "p3", "p4", "p5"]
    assert [e["id"] for e in errors] == ["p2"] and "no answer within pipeline.call_timeout_s=5.0" in errors[0]["error"]
    assert summary.replica_restarts >= 2  # the hung replica is restarted after each timeout


def test_with_two_replicas_a_dead_one_is_routed_around(ray_session, tiny_model, tmp_path):
    """Replica 0 is SIGKILLed before the run and cannot restart, so the calls sent to it (the first one
    is: both are idle and it comes first) can only be answered by replica 1. Killing it mid-run
    instead raced the run's end: with a tiny model the run could finish before a call reached it.

    All 12 prompts are one batch of one stage actor (one pool client), so their first calls leave as
    one merged call: the only call sent to replica 0 before its death is known. In batches of 2, a
    batch arriving while that call was failing could be routed there too (in flight 1 and 1: the
    first replica again) and fail once more: retries 2 in CI, a race. Every later call must avoid
    replica 0, or it fails again and is counted."""
    cfg = make_config(
        tiny_model,
        roles={"generator": {"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1, "replicas": 2, "max_restarts": 0}},
        pipeline={"batch_size": 12, "stage_actors": 1, "ready_timeout_s": 300},
    )
    summary, rows, errors = run(cfg, prompts(12), tmp_path / "out.jsonl", before=lambda pids: os.kill(pids[0], signal.SIGKILL))
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(12)) and errors == []
    assert summary.replica_restarts == 0
    # Out of rotation after its first failure: one failed attempt per client, not one per call routed there.
    assert summary.retries == 1, summary.retries


def test_a_pool_out_of_restarts_stops_the_run_with_a_clear_error(ray_session, tiny_model, tmp_path):
    from actors.errors import BackendError

    cfg = make_config(
        tiny_model,
        mode="greedy",
        roles={"generator": faulty_role({"model": tiny_model, "backend": "hf", "num_cpus": 1, "threads": 1, "max_restarts": 0}, crash_on="POISON")},
    )
    with pytest.raises(Exception) as raised:
        run(cfg, prompts(4, poison_at=0), tmp_path / "out.jsonl")
    assert isinstance(raised.value, BackendError) or "out of restarts" in str(raised.value)

