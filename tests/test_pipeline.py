"""The Ray pipeline on a real local cluster: pools as actors, Ray Data stages, sinks, errors per row."""

import json

import pytest

from engine.placement import plan_pools
from conftest import make_config
from actors.errors import ConfigError
from engine.inputs import Prompt
from engine.runner import execute
from engine.sinks import JsonlSink
from engine.summary import Summary


def prompts(n, words=None):
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": words or f"Question number {i}?"}], line=i + 1) for i in range(n)]


def read(path):
    return [json.loads(line) for line in open(path)]


def run_pipeline(cfg, items, out):
    summary = Summary(cfg.mode, cfg.config_hash())
    batches = []
    execute(cfg, items, JsonlSink(out, []), summary, progress=False, on_rows=batches.append)
    return summary, batches


def check_row(row, cfg):
    """The documented output row, and that every index in it points where it says."""
    assert set(row) == {"id", "messages", "mode", "config_hash", "final", "selected", "candidates", "usage"}
    assert len(row["candidates"]) == cfg.generate.num_responses
    for cand in row["candidates"]:
        kept = [i for i, f in enumerate(cand["feedback"]) if f["kept"]]
        assert all(set(s) <= set(kept) and 1 <= len(s) <= cfg.feedback.set_size for s in cand["feedback_sets"])
        assert len(cand["edits"]) == cfg.edit.edits_per_set * len(cand["feedback_sets"])
        assert all(0 <= e["feedback_set"] < len(cand["feedback_sets"]) for e in cand["edits"])
    sel = row["selected"]
    cand = row["candidates"][sel["response"]]
    chosen = cand["text"] if sel["edit"] is None else cand["edits"][sel["edit"]]["text"]
    assert row["final"] == chosen
    if sel["edit"] is not None:
        assert sel["feedback_set"] == cand["edits"][sel["edit"]]["feedback_set"]


def test_feedback_edit_streams_every_prompt_through_one_shared_pool(ray_session, tiny_model, tmp_path):
    cfg = make_config(tiny_model, generate={"num_responses": 2}, feedback={"plan": "3@0.7", "effective": 2, "sets": "partition", "set_size": 1}, edit={"edits_per_set": 2})
    pools = plan_pools(cfg)
    assert len(pools) == 1 and sorted(next(iter(pools.values())).roles) == ["editor", "feedback", "generator", "reward"]
    summary, batches = run_pipeline(cfg, prompts(6), tmp_path / "out.jsonl")
    rows = read(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    for row in rows:
        check_row(row, cfg)
        assert len(row["candidates"][0]["feedback"]) == 3
        assert set(row["usage"]) == {"generate", "feedback", "edit", "select"}
    sft = read(tmp_path / "out.sft.jsonl")
    assert {r["id"]: r["messages"][-1]["content"] for r in sft} == {r["id"]: r["final"] for r in rows}
    assert all(r["messages"][-1]["role"] == "assistant" for r in sft)
    assert len(batches) > 1  # rows arrive batch by batch while later prompts are still in flight
    assert summary.prompts == 6 and summary.responses == 12 and summary.feedback == 36
    assert summary.edits == sum(len(c["edits"]) for r in rows for c in r["candidates"])
    assert summary.tokens["feedback"]["completion_tokens"] > 0 and summary.wall_s > 0


def test_a_prompt_over_the_context_fails_alone(ray_session, tiny_model, tmp_path):
    cfg = make_config(tiny_model, mode="greedy")
    items = prompts(3) + [Prompt(id="huge", messages=[{"role": "user", "content": "word " * 700}], line=4)]
    summary, _ = run_pipeline(cfg, items, tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in read(tmp_path / "out.jsonl")) == ["p0", "p1", "p2"]
    [err] = read(tmp_path / "out.errors.jsonl")
    assert err["id"] == "huge" and err["stage"] == "generate" and "model's context is 512" in err["error"]
    assert summary.failed == 1 and summary.prompts == 3


def test_classifier_reward_gets_its_own_pool_and_two_replicas_serve_one_role(ray_session, tiny_model, tiny_classifier, tmp_path):
    cfg = make_config(
        tiny_model,
        mode="best_of_n",
        roles={"generator": {"model": tiny_model, "num_cpus": 0.5, "threads": 1, "replicas": 2}, "reward": {"model": tiny_classifier, "num_cpus": 0.5, "threads": 1}},
        generate={"num_responses": 3},
        select={"scorer": "sequence_classification"},
    )
    pools = plan_pools(cfg)
    assert sorted(p.roles[0] for p in pools.values()) == ["generator", "reward"]
    assert any(name.endswith(":classifier") for name in pools)
    run_pipeline(cfg, prompts(4), tmp_path / "out.jsonl")
    rows = read(tmp_path / "out.jsonl")
    assert len(rows) == 4
    for row in rows:
        scores = [c["score"] for c in row["candidates"]]
        assert None not in scores and row["selected"]["score"] == max(scores)


def test_roles_sharing_a_model_must_agree_on_its_settings(tiny_model):
    cfg = make_config(tiny_model, roles={"generator": {"model": tiny_model}, "feedback": {"model": tiny_model, "replicas": 2}})
    with pytest.raises(ConfigError, match="roles.feedback and roles.generator share model .* differ in replicas"):
        plan_pools(cfg)
    self_cfg = make_config(tiny_model, mode="self_feedback_self_edit", roles={"generator": {"model": tiny_model}, "feedback": {"model": "/other"}})
    assert len(plan_pools(self_cfg)) == 1  # the mode routes feedback to the generator; /other is never loaded


def test_missing_model_path_names_the_config_key(ray_session, tmp_path):
    from engine.pools import Pools

    cfg = make_config(str(tmp_path / "no-such-model"), mode="greedy")
    with pytest.raises(ConfigError, match=r"`roles.generator.model`: model path .* does not exist"):
        Pools(cfg).start()


def test_a_replica_that_cannot_load_fails_the_start_cleanly(ray_session, tmp_path):
    from engine.pools import Pools
    from actors.errors import BackendError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # a folder without weights or tokenizer
    with pytest.raises(BackendError, match=r"pool hf:broken \(roles generator\) failed to start: "):
        with Pools(make_config(str(broken), mode="greedy")):
            pass
    live = [pg for pg in ray_session.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert live == []  # nothing left reserved


def test_a_replica_no_node_can_hold_is_refused_at_once(ray_session, tiny_model):
    from engine.pools import Pools

    cfg = make_config(tiny_model, mode="greedy", roles={"generator": {"model": tiny_model, "num_cpus": 64}})
    with pytest.raises(ConfigError, match=r"needs 64 CPUs and 0 GPUs on one node, and no node .* lower `roles.generator.num_cpus`"):
        Pools(cfg).start()


def test_a_model_free_step_rides_in_the_stage_before_it(tiny_model):
    """filter/rerank costs microseconds: it runs in the feedback stage, not in an actor of its own."""
    from engine.modes import MAX_STAGES
    from engine.pipeline import stages
    from engine.steps import build_steps

    for mode in ("feedback_edit", "edit_without_feedback", "greedy"):
        cfg = make_config(tiny_model, mode=mode)
        grouped = [[s.name for s in stage] for stage in stages(build_steps(cfg, lambda role: None))]
        assert len(grouped) <= MAX_STAGES and all(stage[0] != "filter" for stage in grouped)
        assert [stage[0] for stage in grouped] == list(cfg.spec.stages)  # the modes' stage list is the pipeline's
        if mode == "feedback_edit":
            assert grouped == [["generate"], ["feedback", "filter"], ["edit"], ["select"]]
