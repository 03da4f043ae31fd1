"""The performance benchmarks' premises: the raw baseline does the same work as the engine, and the
reports are written where the README says (the benchmarks' numbers themselves are not asserted)."""

from __future__ import annotations

import asyncio
import json

from actors.registry import make_backend
from engine.placement import plan_pools
from benchmarks.record import record
from benchmarks.workload import DirectClient, generated_tokens, prompts, run_flat
from engine.runner import execute
from engine.steps import build_steps
from engine.summary import Summary
from conftest import make_config


class _Keep:
    def __init__(self):
        self.states = []

    def write(self, states):
        self.states.extend(states)

    def close(self):
        pass


def _flat(cfg, batch, split_fanout=False):
    async def run():
        backend = make_backend(next(iter(plan_pools(cfg).values())).spec)
        client = DirectClient(backend, split_fanout=split_fanout)
        states, _ = await run_flat(cfg, build_steps(cfg, lambda role: client), batch)
        return states, client.per_sample_prompt_tokens

    return asyncio.run(run())


def test_prompts_cycle_the_file_with_distinct_ids():
    batch = prompts(9)
    assert len(batch) == 9 and len({p.id for p in batch}) == 9
    assert batch[4].messages == batch[0].messages and batch[4].id == f"{batch[0].id}#1"


def test_the_raw_baseline_does_the_engines_work(ray_session, tiny_model):
    """Greedy everywhere, so both paths must produce the same answers and the same tokens per stage."""
    cfg = make_config(tiny_model, generate={"num_responses": 2, "temperature": 0.0}, feedback={"plan": "2@0.0", "guided_level": True})
    batch = prompts(3)
    flat, _ = _flat(cfg, batch)
    sink = _Keep()
    summary = execute(cfg, batch, sink, Summary(cfg.mode, ""), progress=False)
    engine = {s.id: s for s in sink.states}
    assert summary.prompts == 3
    assert [engine[s.id].final for s in flat] == [s.final for s in flat]
    assert [engine[s.id].usage for s in flat] == [s.usage for s in flat]
    assert generated_tokens(list(engine.values())) == summary.completion_tokens == generated_tokens(flat)


def test_split_fanout_asks_n_single_requests_and_counts_every_samples_prompt(tiny_model):
    cfg = make_config(tiny_model, mode="best_of_n", generate={"num_responses": 3, "temperature": 0.0})
    batch = prompts(1)
    fanned, per_sample = _flat(cfg, batch)
    split, per_sample_split = _flat(cfg, batch, split_fanout=True)
    assert len(split[0].candidates) == len(fanned[0].candidates) == 3
    prompt = fanned[0].usage["generate"].prompt_tokens
    assert split[0].usage["generate"].prompt_tokens == 3 * prompt  # each single request prefilled its prompt
    assert per_sample == per_sample_split >= 3 * prompt


def test_record_appends_the_table_and_ends_with_the_headline(tmp_path, capsys):
    for value in (1, 2):
        record(tmp_path / "bench", "benchmarks.x", ["--quick"], "| a |\n|---|", f"note {value}", {"v": value}, "metric", value)
    md = (tmp_path / "bench.md").read_text()
    assert md.count("`python -m benchmarks.x --quick`") == 2 and "note 1" in md and "note 2" in md
    assert json.loads((tmp_path / "bench.json").read_text())["v"] == 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == "metric=2"
