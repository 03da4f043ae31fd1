"""The Ray pipeline on a real local cluster: pools as actors, Ray Data stages, sinks, errors per row."""

import asyncio
import json
import logging

import pyarrow as pa
import pytest

from engine.placement import plan_pools
from conftest import make_config
from actors.errors import BackendError, ConfigError, RequestError
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


# -- one prompt's failure in a stage is its row's error; a systemic one stops the job (no Ray needed) --


class FakeStep:
    """A step that writes a final answer, or raises `fail(state)` when that returns an exception."""

    def __init__(self, name, fail=lambda state: None):
        self.name, self.fail = name, fail

    async def run(self, state):
        error = self.fail(state)
        if error is not None:
            raise error
        state.final = f"{self.name} answered {state.id}"


def stage_batch(ids, content="Question?"):
    from engine.rows import PromptState

    states = [PromptState(id=i, messages=[{"role": "user", "content": content}], mode="greedy", config_hash="h") for i in ids]
    return pa.table({"id": ids, "state": [s.to_json() for s in states]})


def run_stage(steps, batch):
    from engine.pipeline import StageActor
    from engine.rows import PromptState

    out = asyncio.run(StageActor(steps)(batch)).to_pydict()
    states = [PromptState.from_json(s) for s in out["state"]]
    assert out["id"] == [s.id for s in states]  # the {id, state} schema, also for error rows
    return {s.id: s for s in states}


@pytest.fixture
def fescale_log(caplog):
    """The "fescale" logger's records at DEBUG (the CLI turns its propagation off, so listen on it)."""
    logger = logging.getLogger("fescale")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_a_step_that_raises_for_one_prompt_fails_only_its_row(fescale_log):
    def template_bug(state):
        if state.id == "p1":
            return ValueError("Conversation roles must alternate user/assistant\nsecond line of the message")
        if state.id == "p2":
            return RequestError("prompt is 700 tokens, the model's context is 512")
        if state.id == "p3":
            return KeyError("choices")
        return None

    rows = run_stage([FakeStep("generate", template_bug), FakeStep("select")], stage_batch(["p0", "p1", "p2", "p3", "p4"]))
    assert {i: s.final for i, s in rows.items() if s.error is None} == {"p0": "select answered p0", "p4": "select answered p4"}
    assert rows["p1"].error.to_dict() == {
        "stage": "generate",
        "message": "internal error in generate: ValueError: Conversation roles must alternate user/assistant",
    }
    assert rows["p2"].error.message == "prompt is 700 tokens, the model's context is 512"
    assert rows["p3"].error.message == "internal error in generate: KeyError: 'choices'"
    assert rows["p1"].final is None  # a failed row skips the stage's later steps
    debug = {r.getMessage() for r in fescale_log.records if r.levelno == logging.DEBUG and r.exc_info}
    assert debug == {"prompt p1: internal error in generate", "prompt p3: internal error in generate"}  # with tracebacks


@pytest.mark.parametrize("error", [BackendError("pool hf:m: a replica is dead and out of restarts"), ConfigError("`x` is wrong")])
def test_a_systemic_error_in_one_row_stops_the_job(error):
    with pytest.raises(type(error), match=str(error).replace("`", ".")):
        run_stage([FakeStep("generate", lambda s: error if s.id == "p1" else None)], stage_batch(["p0", "p1"]))


def test_a_state_that_cannot_be_serialized_is_an_error_row_of_its_id():
    class Surrogate(FakeStep):
        async def run(self, state):
            state.final = "half \ud800 an emoji" if state.id == "p1" else "fine"

    rows = run_stage([Surrogate("edit")], stage_batch(["p0", "p1"], content="Question \U0001F600?"))
    assert rows["p0"].error is None and rows["p0"].final == "fine"
    assert rows["p1"].error.stage == "edit"
    assert rows["p1"].error.message.startswith("internal error in edit: UnicodeEncodeError: ")
    assert rows["p1"].messages[0].content == "Question \U0001F600?"  # its prompt kept, for the errors file and summary


def test_an_actor_freezes_its_startup_heap_and_a_driver_keeps_its_own(ray_session):
    """Stage actors, shard writers and replicas freeze what startup left (the collector walked Ray's
    ~140,000 objects again and again: 28% of a stage actor's CPU); a driver's or a test's heap is
    its owner's, and stays as it is."""
    import gc

    from actors.heap import freeze_startup_heap

    @ray_session.remote(num_cpus=0)
    class Probe:
        def frozen(self):
            freeze_startup_heap()
            return gc.get_freeze_count()

    before = gc.get_freeze_count()
    freeze_startup_heap()
    assert gc.get_freeze_count() == before
    probe = Probe.remote()
    assert ray_session.get(probe.frozen.remote()) > 10_000
    ray_session.kill(probe)


@pytest.mark.parametrize("rows, actors", [(0, 1), (1, 1), (32, 1), (33, 2), (20_000, 2)])
def test_a_run_starts_no_stage_actor_without_a_batch(rows, actors):
    from engine.config import PipelineConfig
    from engine.pipeline import for_rows

    cfg = PipelineConfig()  # the defaults: 32 prompts a batch, 2 stage actors
    assert (cfg.batch_size, cfg.stage_actors) == (32, 2)
    sized = for_rows(cfg, rows)
    assert sized.stage_actors == actors and sized.batch_size == cfg.batch_size
