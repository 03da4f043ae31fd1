"""The plan as Ray Data: one `map_batches` stage per method step, streaming rows of whole prompts.

Rows are `{id, state}` with `state` the prompt's `PromptState` as JSON: every candidate of a prompt
stays in its row, so stages are one-in-one-out and never shuffle, and the row schema is the same
string column at every stage (no Arrow type drift between batches with and without feedback).

Stage actors hold no model. Each is an async actor that runs the prompts of several batches at once
and awaits the role pools, which batch the calls of all stages together; so a stage costs a tenth
of a CPU and the model replicas stay busy while rows stream from generate to select.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import ray

from engine.config import PipelineConfig
from engine.errors import RequestError
from engine.rows import PromptState, RowError
from engine.steps import Step

MAX_STAGES = 5  # generate, feedback, filter, edit, select


class StageActor:
    """Runs one step over a batch of rows; a prompt that fails with a RequestError carries its error on."""

    def __init__(self, step: Step):
        self.step = step

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        states = [PromptState.model_validate_json(s) for s in batch["state"]]
        await asyncio.gather(*(self._run(s) for s in states))
        return {"id": [s.id for s in states], "state": [s.model_dump_json() for s in states]}

    async def _run(self, state: PromptState) -> None:
        if state.error is not None:
            return
        try:
            await self.step.run(state)
        except RequestError as e:
            state.error = RowError(stage=self.step.name, message=str(e))


def to_dataset(states: list[PromptState], batch_size: int) -> ray.data.Dataset:
    """Rows in blocks of one batch each, so the first batches reach the model at once."""
    items = [{"id": s.id, "state": s.model_dump_json()} for s in states]
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))


def build_pipeline(ds: ray.data.Dataset, steps: list[Step], cfg: PipelineConfig) -> ray.data.Dataset:
    for step in steps:
        ds = ds.map_batches(
            StageActor,
            fn_constructor_kwargs={"step": step},
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
