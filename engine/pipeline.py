"""The plan as Ray Data: one `map_batches` stage runs the method's steps over rows of whole prompts.

Rows are `{id, state}` with `state` the prompt's `PromptState` as JSON: every candidate of a prompt
stays in its row, so the stage is one-in-one-out and never shuffles.

The stage actors hold no model. Each is an async actor that runs the prompts of several batches at
once, each prompt through all its steps on its own, awaiting the role pools, which batch the calls of
all prompts and steps together: so the model replicas stay busy while rows stream from generate to
select. All steps share one stage because a stage per step would buy nothing but cost: every hand-off
re-encodes the row (tens of KB of JSON once feedback is in), converts it to Arrow and moves it to
another process, and the engine-overhead benchmark measured that as most of the engine's CPU per
prompt. Prompts in flight: `batch_size x max_concurrent_batches x stage_actors`.
"""

from __future__ import annotations

import asyncio
import logging
import math

import pyarrow as pa
import ray

from actors.errors import BackendError, ConfigError, PromptError
from actors.heap import freeze_startup_heap
from engine.config import PipelineConfig
from engine.rows import Message, PromptState, RowError
from engine.steps import Step

log = logging.getLogger("fescale")


STAGES = 2  # stage-actor pools a job starts at most: the method's, and distill's shard writers


class StageActor:
    """Runs the method's steps over a batch of rows. What fails for one prompt fails only its row, which
    carries its error on: a `PromptError` with its message, and any other exception of a step (a chat
    template, a tokenizer, a bug met by one prompt's data) as an internal error of that step, with
    its traceback in the "fescale" debug log. A `BackendError` or `ConfigError` is everyone's (a model
    gone, a wrong setting): it stops the job, as it would fail every other row anyway."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        freeze_startup_heap()  # the prompts' short-lived objects are what the collector should see

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """Arrow in and out (`batch_format="pyarrow"`): Ray Data's numpy batches would convert every
        68 KB state to a numpy object array and back, 4% of a stage actor's CPU."""
        states = [PromptState.from_json(s) for s in batch.column("state").to_pylist()]
        await asyncio.gather(*(self._run(s) for s in states))
        rows = [self._serialized(s) for s in states]
        return pa.table({"id": pa.array([row_id for row_id, _ in rows], pa.string()), "state": pa.array([state for _, state in rows], pa.string())})

    async def _run(self, state: PromptState) -> None:
        for step in self.steps:
            if state.error is not None:
                return
            try:
                await step.run(state)
            except PromptError as e:
                state.error = RowError(stage=step.name, message=str(e))
            except (BackendError, ConfigError):
                raise
            except Exception as e:
                log.debug("prompt %s: internal error in %s", state.id, step.name, exc_info=True)
                state.error = RowError(stage=step.name, message=self._reason(step.name, e))

    def _serialized(self, state: PromptState) -> tuple[str, str]:
        """(id, state JSON) of a row; a state that cannot be written (text no UTF-8 can hold, say)
        becomes an error row of the same id and prompt, escaped so that it can."""
        try:
            return state.id, state.to_json()
        except Exception as e:
            stage = state.error.stage if state.error else self.steps[-1].name
            log.debug("prompt %s: state not serializable after %s", state.id, stage, exc_info=True)
            failed = PromptState(
                id=self._escaped(state.id),
                messages=[Message(role=m.role, content=self._escaped(m.content)) for m in state.messages],
                mode=state.mode,
                config_hash=state.config_hash,
                error=RowError(stage=stage, message=self._escaped(self._reason(stage, e))),
            )
            return failed.id, failed.to_json()

    @staticmethod
    def _reason(step: str, error: Exception) -> str:
        """One line for the errors file: the step, the exception's type and its message's first line.
        A replica's own exception arrives wrapped by Ray: the original is named, not the wrapper."""
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, Exception):
            error = error.cause
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        return f"internal error in {step}: {type(error).__name__}" + (f": {first}" if first else "")

    @staticmethod
    def _escaped(text: str) -> str:
        """`text` with what UTF-8 cannot encode (lone surrogates) written as backslash escapes."""
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def to_dataset(states: list[PromptState], batch_size: int) -> ray.data.Dataset:
    """Rows in blocks of one batch each, so the first batches reach the model at once."""
    items = [{"id": s.id, "state": s.to_json()} for s in states]
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))


def for_rows(cfg: PipelineConfig, rows: int) -> PipelineConfig:
    """`cfg` for a run of `rows` prompts: no stage actor without a batch of its own (the README's
    four prompts start one, not an idle second that Ray Data warns about)."""
    return cfg.model_copy(update={"stage_actors": min(cfg.stage_actors, max(1, math.ceil(rows / cfg.batch_size)))})


def build_pipeline(ds: ray.data.Dataset, steps: list[Step], cfg: PipelineConfig) -> ray.data.Dataset:
    return ds.map_batches(
        StageActor,
        fn_constructor_kwargs={"steps": steps},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=cfg.stage_actors,
            max_tasks_in_flight_per_actor=cfg.max_concurrent_batches,
            max_concurrent_calls_per_actor=cfg.max_concurrent_batches,
        ),
        num_cpus=cfg.stage_num_cpus,
        udf_modifying_row_count=False,
    )
