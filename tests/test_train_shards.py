"""Each training worker reads only its shard: its part of every planned step, its share of validation.

The Ray Train run goes through the stages' own path (`train.runner.fit`: the per-rank Ray Data
datasets, the worker entry point, `train.loop.run` with DeepSpeed ZeRO-2 on gloo, checkpoints,
resume) with 2 workers; only the Task is a probe (a one-parameter model) that records the items it
is given, so the run takes seconds rather than a real model's minutes.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch

from conftest import SHARED
from train.config import load_train_config
from train.loop import TaskBase
from train.outputs import RunOutput
from train.prepare import Drops
from train.recipe import Recipe
from train.runner import Prepared, fit
from train.stages import RECIPES

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

TRAIN = [{"id": f"t{i}", "ids": list(range(i)), "key": (i, "k")} for i in range(9)]  # ragged lists and tuples survive
VALIDATION = [{"id": f"v{i}"} for i in range(5)]  # odd: the two shares differ in size


class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return (self.w * x).sum()

    def save_pretrained(self, path, state_dict=None):
        Path(path).mkdir(parents=True, exist_ok=True)
        torch.save(state_dict or self.state_dict(), Path(path) / "probe.pt")


class ProbeTask(TaskBase):
    """Records, per rank, the rows its train shard holds, the items of each step and of each validation pass."""

    metric, mode = "val_items", "max"

    def build_model(self):
        self.rank = ray.train.get_context().get_world_rank()
        self._write({"kind": "shard", "ids": [it["id"] for batch in self.train.batches(3) for it in batch]})
        self.pending = []
        return Probe()

    def loss(self, engine, items):
        assert all(isinstance(it["ids"], list) and isinstance(it["key"], tuple) for it in items)
        self.pending += [it["id"] for it in items]
        return engine(torch.ones(4)), {}, len(items)

    def after_step(self, engine, step):
        self._write({"kind": "step", "step": step, "ids": self.pending})
        self.pending = []
        return {}

    def evaluate(self, engine):
        ids = [it["id"] for batch in self.validation.batches(2) for it in batch]
        self._write({"kind": "validation", "ids": ids})
        return {"val_items": (float(len(ids)), 1.0)}

    def _write(self, record):
        with open(Path(self.cfg.output_dir) / f"seen-{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class ProbeRecipe(Recipe):
    def prepare(self, cfg, fmt, sources):
        return TRAIN, VALIDATION


RECIPE = ProbeRecipe("edit-sft", ProbeTask)


def seen(out, rank, kind):
    return [r for r in map(json.loads, open(out / f"seen-{rank}.jsonl")) if r["kind"] == kind]


def config(out, *sets):
    return load_train_config("edit-sft", "edit-sft", [
        f"data.dir={SHARED / 'fixtures' / 'helpsteer3'}", f"output_dir={out}", "resources.num_workers=2",
        "optim.global_batch_size=4", "optim.micro_batch_size=1", "optim.warmup_steps=0", "checkpoint_every=2",
        "resources.max_failures=0", *sets,
    ])


@pytest.mark.slow
def test_each_worker_reads_only_its_part_of_every_step_and_its_validation_share(ray_session, tiny_model, tmp_path):
    cfg = config(tmp_path, f"model={tiny_model}")
    prepared = Prepared(TRAIN, VALIDATION, {}, Drops())
    plan = [items for _, items in RECIPE.schedule(cfg, TRAIN, 4)]  # 2 steps per epoch (9 // 4): epochs 0 and 1
    assert fit(cfg, RECIPE, prepared, 3, {}, RunOutput.of(str(tmp_path))).checkpoint is not None
    for rank in (0, 1):
        mine = [[it["id"] for it in step[rank * 2 : rank * 2 + 2]] for step in plan]
        steps = seen(tmp_path, rank, "step")
        assert [s["step"] for s in steps] == [1, 2, 3] and [s["ids"] for s in steps] == mine[:3]
        (shard,) = seen(tmp_path, rank, "shard")
        assert shard["ids"] == sum(mine[:3], [])  # the shard holds this rank's part of the run, nothing else
        assert [v["ids"] for v in seen(tmp_path, rank, "validation")] == [[it["id"] for it in VALIDATION[rank::2]]] * 2
    epoch0 = sum((s["ids"] for rank in (0, 1) for s in seen(tmp_path, rank, "step")[:2]), [])
    assert sorted(epoch0) == sorted(it["id"] for step in plan[:2] for it in step) and len(set(epoch0)) == 8  # once each
    passes = [seen(tmp_path, rank, "validation")[0]["ids"] for rank in (0, 1)]
    assert Counter(passes[0] + passes[1]) == Counter(it["id"] for it in VALIDATION)  # every item once across workers

    # the same command with one more step resumes from step 3's checkpoint and trains planned step 4 only
    fit(cfg, RECIPE, prepared, 4, {}, RunOutput.of(str(tmp_path)))
    for rank in (0, 1):
        last = seen(tmp_path, rank, "step")[3:]
        assert [(s["step"], s["ids"]) for s in last] == [(4, [it["id"] for it in plan[3][rank * 2 : rank * 2 + 2]])]


def test_the_schedule_is_the_same_items_whatever_the_run_length():
    cfg = config("unused", "model=embedded", "optim.global_batch_size=2")
    long = list(RECIPE.schedule(cfg, TRAIN, 9))
    assert list(RECIPE.schedule(cfg, TRAIN, 5)) == long[:5]
    assert [e for e, _ in long] == [0, 0, 0, 0, 1, 1, 1, 1, 2]  # 4 full steps of 2 per epoch, reshuffled each epoch
    assert len({it["id"] for _, step in long[:4] for it in step}) == 8 and long[0] != long[4]


def test_an_epoch_of_no_full_step_is_a_config_error():
    from actors.errors import ConfigError

    cfg = load_train_config("edit-rm", "edit-rm", [f"data.dir={SHARED}", "rm.tuples_per_step=3"])
    items = [{"id": i, "key": "k"} for i in range(4)]  # one tuple: never 3 distinct in a step
    with pytest.raises(ConfigError, match=r"^edit-rm: epoch 0 makes no full step of 3; lower rm.tuples_per_step or add data$"):
        list(RECIPES["edit-rm"].schedule(cfg, items, 1))
