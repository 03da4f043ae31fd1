"""The plan as Ray Data: one `map_batches` stage per method step, streaming rows of whole prompts.

Rows are `{id, state}` with `state` the prompt's `PromptState` as JSON: every candidate of a prompt
stays in its row, so stages are one-in-one-out and never shuffle, and the row schema is the same
string column at every stage (no Arrow type drift between batches with and without feedback).

Stage actors hold no model. Each is an async actor that runs the prompts of several batches at once
and awaits the role pools, which batch the calls of all stages together; so a stage costs a tenth
of a CPU and the model replicas stay busy while rows stream from generate to select. A step that
calls no model (filter/rerank) runs in the stage of the step before it: its own stage would cost
an actor process and a hand-off of every row for microseconds of work.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import ray

from actors.errors import PromptError
from engine.config import PipelineConfig
from engine.rows import PromptState, RowError
from engine.steps import Step

class StageActor:
    """Runs a stage's steps over a batch of rows; a prompt that fails with a PromptError carries its error on."""

    def __init__(self, steps: list[Step]):
        self.steps = steps

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        states = [PromptState.model_validate_json(s) for s in batch["state"]]
        await asyncio.gather(*(self._run(s) for s in states))
        return {"id": [s.id for s in states], "state": [s.model_dump_json() for s in states]}

    async def _run(self, state: PromptState) -> None:
        for step in self.steps:
            if state.error is not None:
                return
            try:
                await step.run(state)
            except PromptError as e:
                state.error = RowError(stage=step.name, message=str(e))


def to_dataset(states: list[PromptState], batch_size: int) -> ray.data.Dataset:
    """Rows in blocks of one batch each, so the first batches reach the model at once."""
    items = [{"id": s.id, "state": s.model_dump_json()} for s in states]
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))


def stages(steps: list[Step]) -> list[list[Step]]:
    """Steps grouped into stages: each model-calling step with the model-free steps after it."""
    grouped: list[list[Step]] = []
    for step in steps:
        if step.calls_model or not grouped:
            grouped.append([step])
        else:
            grouped[-1].append(step)
    return grouped


def build_pipeline(ds: ray.data.Dataset, steps: list[Step], cfg: PipelineConfig) -> ray.data.Dataset:
    for stage in stages(steps):
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={"steps": stage},
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=cfg.stage_actors,
                max_tasks_in_flight_per_actor=cfg.max_concurrent_batches,
                max_concurrent_calls_per_actor=cfg.max_concurrent_batches,
            ),
            num_cpus=cfg.stage_num_cpus,
            udf_modifying_row_count=False,
        )
    return ds
