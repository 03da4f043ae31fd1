"""`fescale train <stage>`: prepare the stage's data on the driver, then train on Ray Train workers.

    config -> HelpSteer3 rows (checked) -> the paper's preparation -> token ids (length-filtered)
           -> data report (printed, data_report.json) -> TorchTrainer(DeepSpeed) -> OUTPUT/model

Everything a run writes lives under `output_dir`: `data_report.json`, `metrics.jsonl`, `tensorboard/`,
`ray/<stage>/` (Ray Train's checkpoints; rerunning the same command after a crash or a kill resumes
from the latest one) and `model/`, the best checkpoint as a plain Hugging Face folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.chat_format import ChatFormatter
from actors.models import resolve_model
from engine.errors import BackendError, ConfigError
from train import data, prepare, tokens
from train.config import TrainConfig

log = logging.getLogger("fescale")


@dataclass
class Prepared:
    train: list[dict]
    validation: list[dict]
    rows: dict[str, int] = field(default_factory=dict)
    drops: prepare.Drops = field(default_factory=prepare.Drops)

    def report(self, cfg: TrainConfig) -> dict[str, Any]:
        return {
            "stage": cfg.stage,
            "source_rows": self.rows,
            "train": len(self.train),
            "validation": len(self.validation),
            "dropped": self.drops.as_dict(),
        }


def prepare_stage(cfg: TrainConfig, fmt: ChatFormatter) -> Prepared:
    """The stage's training items: token ids for SFT/RM, prompts for RLOO."""
    d, drops = cfg.data, prepare.Drops()
    rows: dict[str, int] = {}

    def splits(subset: str) -> tuple[list[dict], list[dict]]:
        loaded = data.load_subset(d.dir, subset)
        train, val = loaded["train"][: d.limit], loaded.get("validation", [])[: d.limit]
        if "validation" not in loaded:
            train, val = prepare.split_rows(train, d.validation_fraction, cfg.seed)
        rows.update({f"{subset}/train": len(train), f"{subset}/validation": len(val)})
        return train, val

    if cfg.stage == "feedback-sft":
        build = lambda r: prepare.feedback_demonstrations(r, drops, d.max_level_spread, d.feedback_targets, cfg.seed)  # noqa: E731
        train, val = (tokens.tokenize_sft(fmt, build(r), d.max_seq_len, drops) for r in splits("feedback"))
    elif cfg.stage == "edit-sft":
        applied = prepare.applied_feedback(d.applied_check, cfg.seed) if d.applied_check else None
        build = lambda r: prepare.edit_demonstrations(r, drops, applied, d.joiner)  # noqa: E731
        train, val = (tokens.tokenize_sft(fmt, build(r), d.max_seq_len, drops) for r in splits("edit"))
    elif cfg.stage == "distill-sft":
        examples = prepare.distill_examples(data.load_distill(d.distill)[: d.limit])
        rows["distill"] = len(examples)
        train_ex, val_ex = prepare.split_rows(examples, d.validation_fraction, cfg.seed)
        train, val = (tokens.tokenize_sft(fmt, ex, d.max_seq_len, drops) for ex in (train_ex, val_ex))
    elif cfg.stage == "edit-rm":
        train, val = (tokens.tokenize_preferences(fmt, prepare.edit_preferences(r, drops, d.domains), d.max_seq_len, drops) for r in splits("edit_quality"))
    else:  # edit-rloo: the Edit SFT prompts (context, original, feedback) to roll out edits from
        from train.rloo import rollout_prompts

        train, val = (rollout_prompts(r, drops, d.joiner) for r in splits("edit"))
    return Prepared(list(train), list(val), rows, drops)


def print_report(report: dict[str, Any]) -> None:
    lines = [f"data for {report['stage']}:"]
    lines += [f"  {name}: {n} rows" for name, n in report["source_rows"].items()]
    lines.append(f"  -> {report['train']} train / {report['validation']} validation items after preparation")
    lines += [f"  dropped {n}: {reason}" for reason, n in report["dropped"].items()] or ["  dropped nothing"]
    print("\n".join(lines), flush=True)


def task_class(stage: str):
    if stage == "edit-rm":
        from train.reward_model import RewardModelTask

        return RewardModelTask
    if stage == "edit-rloo":
        from train.rloo import RLOOTask

        return RLOOTask
    from train.sft import SFTTask

    return SFTTask


def items_per_step(cfg: TrainConfig) -> int:
    return {"edit-rm": cfg.rm.tuples_per_step, "edit-rloo": cfg.rloo.rollout_batch_size}.get(cfg.stage, cfg.optim.global_batch_size)


def _worker(config: dict) -> None:
    """Ray Train's per-worker entry point."""
    from transformers import AutoTokenizer

    from train import loop

    cfg = TrainConfig.model_validate(config["cfg"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = task_class(cfg.stage)(cfg, ray.get(config["train"]), ray.get(config["validation"]), pad_id, **config["extras"])
    loop.run(cfg, task, items_per_step(cfg), config["total_steps"], tokenizer)


def train(cfg: TrainConfig, dry_run: bool = False) -> Path | None:
    """Prepare, report, train; returns the final model folder (None for a dry run: data report only)."""
    from transformers import AutoTokenizer

    out = Path(cfg.output_dir).resolve()
    model_path = resolve_model(cfg.model, key="model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prepared = prepare_stage(cfg, ChatFormatter(tokenizer, cfg.data.max_seq_len))
    report = prepared.report(cfg)
    print_report(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    per_step = items_per_step(cfg)
    if cfg.stage == "edit-rm":
        from train.reward_model import rm_steps

        steps_per_epoch = len(rm_steps(prepared.train, per_step, cfg.seed))
    else:
        steps_per_epoch = len(prepared.train) // per_step
    total = steps_per_epoch * cfg.optim.epochs
    total = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
    if total == 0:
        raise ConfigError(
            f"{cfg.stage}: {len(prepared.train)} train items make no full step of {per_step}; lower "
            f"{'rm.tuples_per_step' if cfg.stage == 'edit-rm' else 'rloo.rollout_batch_size' if cfg.stage == 'edit-rloo' else 'optim.global_batch_size'} or add data"
        )
    if not prepared.validation:
        raise ConfigError(f"{cfg.stage}: no validation items after preparation; add a validation file or more rows")
    print(f"{cfg.stage}: {total} optimizer steps of {per_step} items ({steps_per_epoch} per epoch), lr {cfg.lr:g}", flush=True)
    if dry_run:
        return None
    _init_ray(cfg)
    with _rollout_pools(cfg) as extras:
        result = _fit(cfg, prepared, total, extras, out)
    return _export_best(result, out)


def _fit(cfg: TrainConfig, prepared: Prepared, total: int, extras: dict, out: Path):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = cfg.resources
    env = {
        "DS_ACCELERATOR": "cuda" if r.use_gpu else "cpu",
        "OMP_NUM_THREADS": str(r.threads or max(1, math.ceil(r.cpus_per_worker))),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # its logger echo printed every progress line twice
    }
    task = task_class(cfg.stage)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "train": ray.put(prepared.train),
            "validation": ray.put(prepared.validation),
            "total_steps": total,
            "extras": extras,
        },
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker={"CPU": r.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.stage,
            storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=task.metric, checkpoint_score_order=task.mode),
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise BackendError(f"{cfg.stage} failed on a training worker (after {cfg.resources.max_failures} restarts): {lines[-1] if lines else e}") from None


def _export_best(result, out: Path) -> Path:
    """Copy the best checkpoint's model/ to OUTPUT/model (what the engine and the next stage load)."""
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    if best is None:
        raise ConfigError(f"training wrote no checkpoint under {out / 'ray'}")
    final = out / "model"
    with best.as_directory() as d:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(Path(d) / "model", final)
    metrics = result.best_checkpoints[0][1] if result.best_checkpoints else result.metrics
    print(f"best checkpoint: step {metrics.get('step')} ({', '.join(f'{k} {v:.4g}' for k, v in metrics.items() if k.startswith('val_'))}) -> {final}", flush=True)
    return final


def _init_ray(cfg: TrainConfig) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    r = cfg.resources
    rollout = cfg.rloo.rollout.num_cpus * cfg.rloo.rollout.replicas if cfg.stage == "edit-rloo" else 0
    # Ray Train's controller and helper actors need a CPU slot besides the workers'.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(r.num_workers * r.cpus_per_worker + rollout + 2)), include_dashboard=False, logging_level=logging.WARNING)


class _rollout_pools:
    """For edit-rloo: the engine pool that samples rollouts (its clients go to the workers)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.pools = cfg, None

    def __enter__(self) -> dict:
        if self.cfg.stage != "edit-rloo":
            return {}
        from train.rloo import start_rollout_pool

        self.pools, extras = start_rollout_pool(self.cfg)
        return extras

    def __exit__(self, *exc) -> None:
        if self.pools is not None:
            self.pools.shutdown()
