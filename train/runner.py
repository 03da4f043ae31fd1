"""`fescale train <stage>`: prepare the stage's data on the driver, then train on Ray Train workers.

    config -> HelpSteer3 rows (checked) -> the paper's preparation -> token ids (length-filtered)
           -> data report (printed, data_report.json) -> the run's steps, one Ray Data shard per worker
           -> TorchTrainer(DeepSpeed) -> OUTPUT/model

The same for every stage: what differs (data preparation, step size, the Task each worker runs and
what runs beside the workers) is the stage's recipe, `train.stages.RECIPES[cfg.stage]`.

Everything a run writes lives under `output_dir`, a local folder or a URI such as s3://bucket/run
(train/outputs.py): `data_report.json`, `metrics.jsonl`, `tensorboard/`, `ray/<stage>/` (Ray Train's
checkpoints; rerunning the same command after a crash or a kill resumes from the latest one, and a
config that changes training since then is refused: train/resume.py) and `model/`, the best
checkpoint as a plain Hugging Face folder, which appears only once complete.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.chat_format import ChatFormatter
from actors.errors import BackendError, ConfigError, last_line
from actors.models import resolve_model
from engine.cluster import connect
from train import prepare
from train.config import TrainConfig
from train.loop import shard_name, zero_plan
from train.outputs import RunOutput
from train.recipe import Recipe, Sources
from train.resume import check_resume
from train.stages import RECIPES


@dataclass
class Prepared:
    train: list[dict]
    validation: list[dict]
    rows: dict[str, int]
    drops: prepare.Drops

    def report(self, cfg: TrainConfig) -> dict[str, Any]:
        return {
            "stage": cfg.stage,
            "source_rows": self.rows,
            "train": len(self.train),
            "validation": len(self.validation),
            "dropped": self.drops.as_dict(),
        }


def prepare_stage(cfg: TrainConfig, fmt: ChatFormatter) -> Prepared:
    """The stage's training items (token ids for SFT/RM, prompts for RLOO) and what the report shows."""
    sources = Sources(cfg)
    train, val = RECIPES[cfg.stage].prepare(cfg, fmt, sources)
    return Prepared(list(train), list(val), sources.rows, sources.drops)


def print_report(report: dict[str, Any]) -> None:
    lines = [f"data for {report['stage']}:"]
    lines += [f"  {name}: {n} rows" for name, n in report["source_rows"].items()]
    lines.append(f"  -> {report['train']} train / {report['validation']} validation items after preparation")
    lines += [f"  dropped {n}: {reason}" for reason, n in report["dropped"].items()] or ["  dropped nothing"]
    print("\n".join(lines), flush=True)


def _worker(config: dict) -> None:
    """Ray Train's per-worker entry point: the recipe's Task on this worker's shards, run by the loop."""
    from transformers import AutoTokenizer

    from train import loop

    cfg = TrainConfig.model_validate(config["cfg"])
    recipe = config["recipe"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = recipe.task(cfg, *loop.worker_shards(), pad_id, **config["extras"])
    loop.run(cfg, task, recipe.items_per_step(cfg), config["total_steps"], tokenizer, config["output"])


def shard_datasets(cfg: TrainConfig, recipe: Recipe, prepared: Prepared, total: int) -> dict[str, ray.data.Dataset]:
    """One Ray Data dataset per worker and split: `train_<rank>` holds rank's part of each of the run's
    `total` steps in step order, `validation_<rank>` every world-th validation item from rank on.

    The driver plans the steps (`Recipe.schedule`, seeded per epoch) and splits each step by index:
    rank r gets items [r * n, (r + 1) * n) of it, n = step size / workers, the slice the loop and
    DeepSpeed's gradient accumulation expect. Ray Data's own split (`DataConfig(datasets_to_split=...)`,
    `streaming_split`) is not used: it hands whole blocks to whichever worker has read the fewest rows,
    so even with `preserve_order` a worker's s-th batch is not its part of planned step s, and a step
    would lose what the recipe guarantees (edit-rm's distinct tuples per step) and depend on block
    sizes. Explicit per-rank datasets make step s the same items on every rerun and at any Ray version;
    the validation shares cover each item exactly once. Items are pickled once (see `train.loop.Shard`);
    the object store holds the run's steps (epochs x the train set), each worker streams only its own.
    """
    world = cfg.resources.num_workers
    per_worker = recipe.items_per_step(cfg) // world
    blobs = {id(item): pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in prepared.train}
    train: list[list[dict]] = [[] for _ in range(world)]
    for step, (epoch, items) in enumerate(recipe.schedule(cfg, prepared.train, total)):
        for rank in range(world):
            train[rank] += [{"step": step, "epoch": epoch, "item": blobs[id(it)]} for it in items[rank * per_worker : (rank + 1) * per_worker]]
    datasets = {shard_name("train", rank): ray.data.from_items(rows) for rank, rows in enumerate(train)}
    for rank in range(world):
        rows = [{"item": pickle.dumps(it, protocol=pickle.HIGHEST_PROTOCOL)} for it in prepared.validation[rank::world]]
        datasets[shard_name("validation", rank)] = ray.data.from_items(rows)
    for ds in datasets.values():  # a progress bar per shard and pass would break up the loop's step lines
        ds.context.enable_progress_bars = False
    return datasets


def train(cfg: TrainConfig, dry_run: bool = False) -> str | None:
    """Prepare, report, train; returns the final model folder's path or URI (None for a dry run: data
    report only)."""
    from transformers import AutoTokenizer

    out = RunOutput.of(cfg.output_dir)  # a bad location fails here, before any work
    recipe = RECIPES[cfg.stage]
    recipe.check(cfg)
    model_path = resolve_model(cfg.model, key="model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prepared = prepare_stage(cfg, ChatFormatter(tokenizer, cfg.data.max_seq_len))
    report = prepared.report(cfg)
    print_report(report)
    out.write_text("data_report.json", json.dumps(report, indent=2) + "\n")
    per_step = recipe.items_per_step(cfg)
    steps_per_epoch = recipe.steps_per_epoch(cfg, prepared.train)
    total = steps_per_epoch * cfg.optim.epochs
    total = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
    if total == 0:
        raise ConfigError(
            f"{cfg.stage}: {len(prepared.train)} train items make no full step of {per_step}; lower {recipe.batch_key} or add data"
        )
    if not prepared.validation:
        raise ConfigError(f"{cfg.stage}: no validation items after preparation; add a validation file or more rows")
    print(f"{cfg.stage}: {total} optimizer steps of {per_step} items ({steps_per_epoch} per epoch), lr {cfg.lr:g}, {zero_plan(cfg)}", flush=True)
    check_resume(cfg, out.checkpoints(cfg.stage))
    if dry_run:
        return None
    r = cfg.resources
    # Ray Train's controller needs a CPU slot besides the workers' and what the recipe starts.
    connect(None, r.num_workers * r.cpus_per_worker + recipe.reserved_cpus(cfg) + 1, dashboard=True)
    with recipe.extras(cfg) as extras:
        result = fit(cfg, recipe, prepared, total, extras, out)
    return _export_best(result, out)


def fit(cfg: TrainConfig, recipe: Recipe, prepared: Prepared, total: int, extras: dict, out: RunOutput):
    """Train `recipe` on Ray Train workers, each reading its shards (`shard_datasets`); Ray Train's result.

    The shards are not split again by Ray Train (`datasets_to_split=[]`: each worker asks only for its
    own) and are read in order (`preserve_order`), which the loop checks step by step."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.resources
    env = {
        "DS_ACCELERATOR": "cuda" if r.use_gpu else "cpu",
        "OMP_NUM_THREADS": str(r.threads or max(1, math.ceil(r.cpus_per_worker))),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # its logger echo printed every progress line twice
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' load/save bars: a worker's output is a log, not a terminal
    }
    task = recipe.task
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(), "recipe": recipe, "total_steps": total, "extras": extras, "output": out},
        datasets=shard_datasets(cfg, recipe, prepared, total),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.stage,
            storage_path=out.loc.join("ray").path,
            storage_filesystem=out.loc.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=task.metric, checkpoint_score_order=task.mode),
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise BackendError(f"{cfg.stage} failed on a training worker (after {cfg.resources.max_failures} restarts): {last_line(e)}") from None


def _export_best(result, out: RunOutput) -> str:
    """Publish the best checkpoint's model/ as OUTPUT/model (what the engine and the next stage load)."""
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    if best is None:
        raise ConfigError(f"training wrote no checkpoint under {out.loc.join('ray')}")
    with best.as_directory() as d:
        final = out.publish_model(Path(d) / "model")
    metrics = result.best_checkpoints[0][1] if result.best_checkpoints else result.metrics
    print(f"best checkpoint: step {metrics.get('step')} ({', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if k.startswith('val_'))}) -> {final}", flush=True)
    return final.uri
