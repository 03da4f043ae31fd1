"""The per-worker training loop every stage shares: DeepSpeed engine, steps, checkpoints, metrics.

A stage is a `Task` (train/sft.py, train/reward_model.py, train/rloo.py): it builds the model, turns
one step's items into micro-batches and a loss, and evaluates. This loop owns the rest, the same for
all stages:
- DeepSpeed (ZeRO stage from config; on CPU `torch_adam` and gloo, on GPU bf16) with gradient
  accumulation making up the global batch;
- a deterministic order of items (seeded per epoch), so step s is the same items on every rerun and a
  resumed run continues exactly where the checkpoint was taken: the driver plans the steps
  (`Recipe.schedule`) and gives each worker, as a Ray Data dataset, only its part of every step and
  its share of the validation set (train/runner.py `shard_datasets`); a worker streams its `Shard`,
  so its memory does not grow with the data set or the number of workers;
- every `checkpoint_every` steps and at the end: a validation pass, then a Ray Train checkpoint holding
  `model/` (a plain Hugging Face folder the engine loads), `ds/` (DeepSpeed state to resume) and
  `state.json` (the step and the config's fingerprint, train/resume.py); Ray Train keeps the best by
  the task's validation metric and always the latest;
- the config's model knobs on whatever model the task built (`configure_model`): attention kernel
  and gradient checkpointing;
- metrics (step, loss, lr, tokens/s, ...) every `log_every` steps to stdout, `metrics.jsonl` and
  TensorBoard when it is installed.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import ray.train
import torch
import torch.distributed as dist

from actors.errors import FescaleError
from train.config import TrainConfig
from train.outputs import EVENTS, METRICS, RunOutput
from train.resume import fingerprint


class Shard:
    """This worker's rows of one Ray Data dataset the driver built (`shard_datasets` in train/runner.py).

    Rows hold an item pickled (`item`), and in the train shard the `step` and `epoch` it belongs to.
    Pickled because items are whatever a recipe prepared (ragged token lists, chat messages, tuple
    keys): Arrow would hand lists back as numpy arrays and tuples as lists, and the Tasks' collate
    and the RLOO prompts expect the values as built. Read in batches, never whole: what a worker holds
    at once is one step or one micro-batch, not its share of the data set.
    """

    def __init__(self, iterator):
        self.iterator = iterator  # a ray.data.DataIterator (re-iterable: every validation pass reads it again)

    def batches(self, size: int) -> Iterator[list]:
        for batch in self.iterator.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=1):
            yield [pickle.loads(blob) for blob in batch["item"]]

    def steps(self, start: int, per_worker: int) -> Iterator[tuple[int, int, list]]:
        """(step, epoch, this worker's items) of every step after `start`, in order.

        A resumed run (or a worker group Ray Train restarted) reads past the steps already taken: the
        shard always starts at step 0, as Ray Train builds it anew for every worker group. Each step
        number is checked, so a shard out of order stops the run instead of training on other items."""
        expected = start
        for batch in self.iterator.iter_batches(batch_size=per_worker, batch_format="numpy", prefetch_batches=1):
            step = int(batch["step"][0])
            if step < start:
                continue
            if step != expected or (batch["step"] != step).any() or len(batch["step"]) != per_worker:
                raise FescaleError(f"training shard out of order: expected {per_worker} items of step {expected}, read steps {sorted(set(batch['step'].tolist()))}")
            yield step, int(batch["epoch"][0]), [pickle.loads(blob) for blob in batch["item"]]
            expected += 1


def shard_name(split: str, rank: int) -> str:
    """The dataset holding rank `rank`'s part of `split` ("train" or "validation")."""
    return f"{split}_{rank}"


def worker_shards() -> tuple[Shard, Shard]:
    """(train, validation) shards of the calling Ray Train worker.

    Ray Data's notices in this process (that progress bars are off, a line per pass over a shard)
    would break up the step lines; its errors still raise."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    rank = ray.train.get_context().get_world_rank()
    return tuple(Shard(ray.train.get_dataset_shard(shard_name(split, rank))) for split in ("train", "validation"))


class Task(Protocol):
    metric: str  # the validation metric checkpoints are ranked by
    mode: str  # "min" or "max"
    train: Shard  # this worker's part of every step; the loop reads it

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, engine, items: list[Any]) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss, metrics, tokens) of one micro-batch of items."""

    def evaluate(self, engine) -> dict[str, tuple[float, float]]:
        """Validation metrics of this rank's share as (sum, weight); the loop adds them over ranks."""

    def after_step(self, engine, step: int) -> dict[str, float]:
        """Work between optimizer steps (RLOO: the weight sync); metrics of it for the step's record."""


class TaskBase:
    """What every stage's task shares: its config and this worker's shards (`train`, its part of every
    step; `validation`, its share of the validation set, each item on exactly one worker), the
    training dtype, and no work after a step (RLOO overrides that to sync its rollout pool)."""

    def __init__(self, cfg: TrainConfig, train: Shard, validation: Shard, pad_id: int):
        self.cfg, self.train, self.validation, self.pad_id = cfg, train, validation, pad_id

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.resources.use_gpu else torch.float32

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` arguments of the trained model: the dtype and the configured attention kernel
        (given at load, transformers checks the kernel is available before loading any weight)."""
        attn = self.cfg.attn_implementation
        return {"dtype": self.dtype, **({"attn_implementation": attn} if attn else {})}

    def after_step(self, engine, step: int) -> dict[str, float]:
        return {}


def effective_zero_stage(cfg: TrainConfig, world: int) -> int:
    """`deepspeed.zero_stage`, or 0 on a single worker without offload: ZeRO partitions optimizer
    state, gradients and parameters across workers, so one worker has nothing to partition and the
    same math runs without ZeRO's bucketing and copies (`benchmarks.train_throughput`: ZeRO-2 on one
    CPU worker ran at 0.71-0.84 of a plain torch loop, stage 0 at 0.98). Offload needs ZeRO: kept."""
    return cfg.deepspeed.zero_stage if world > 1 or cfg.deepspeed.offload else 0


def zero_plan(cfg: TrainConfig) -> str:
    """The ZeRO stage a run uses, for its plan line; says why when it is not the configured one."""
    stage = effective_zero_stage(cfg, cfg.resources.num_workers)
    if stage == cfg.deepspeed.zero_stage:
        return f"ZeRO stage {stage}"
    return f"ZeRO stage {stage} (deepspeed.zero_stage={cfg.deepspeed.zero_stage}: nothing to partition on one worker)"


def deepspeed_config(cfg: TrainConfig, items_per_step: int, world: int) -> dict:
    micro = cfg.optim.micro_batch_size
    if items_per_step % (micro * world):
        raise ValueError(
            f"{items_per_step} items per step do not split into micro-batches of {micro} on {world} workers; "
            "make optim.micro_batch_size x resources.num_workers divide the step size"
        )
    zero: dict[str, Any] = {"stage": effective_zero_stage(cfg, world)}
    if cfg.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_batch_size": items_per_step,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": items_per_step // (micro * world),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            # DeepSpeed's fused CPU Adam needs a compiler toolchain at run time; torch's AdamW runs anywhere.
            "params": {"lr": cfg.lr, "weight_decay": cfg.optim.weight_decay, "torch_adam": not cfg.resources.use_gpu},
        },
        "steps_per_print": 10**9,  # the loop logs
    }
    if cfg.resources.use_gpu:
        ds["bf16"] = {"enabled": True}
    return _merge(ds, cfg.deepspeed.extra)


def configure_model(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """The config's model knobs on the model a task built, so every stage gets them however it loads.

    The attention kernel is set again only if the build did not ask for it. Gradient checkpointing
    is non-reentrant: the reentrant form computes no gradients when the checkpointed blocks' inputs do
    not require them (frozen embeddings)."""
    if cfg.attn_implementation and model.config._attn_implementation != cfg.attn_implementation:
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def warmup_then_constant(optimizer, warmup_steps: int):
    """The paper's schedule: LR rises linearly from 0 over `warmup_steps` optimizer steps, then stays.

    (DeepSpeed's WarmupLR would do, but it raises any warmup below 2 steps to 2.)
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / warmup_steps) if warmup_steps else 1.0)


def run(cfg: TrainConfig, task: Task, items_per_step: int, total_steps: int, tokenizer, output: RunOutput) -> None:
    """The loop on one Ray Train worker."""
    import deepspeed

    torch.set_num_threads(cfg.resources.threads or max(1, math.ceil(cfg.resources.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = task.build_model()
    configure_model(model, cfg)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, items_per_step, world),
        lr_scheduler=lambda optimizer: warmup_then_constant(optimizer, cfg.optim.warmup_steps),
    )
    start = _resume(engine)
    log = _Log(output, rank, start)
    if start:
        log.write({"step": start}, total_steps, kind="resume")  # "resume step 4/10": continues after step 4
    per_worker = items_per_step // world
    micro = cfg.optim.micro_batch_size
    for index, epoch, mine in task.train.steps(start, per_worker):
        engine.train()
        lr = engine.get_lr()[0]  # the rate this step uses (warmup starts at 0, as in HF's schedules)
        tic, tokens, sums = time.perf_counter(), 0, {}
        for start_i in range(0, per_worker, micro):
            loss, metrics, n = task.loss(engine, mine[start_i : start_i + micro])
            engine.backward(loss)
            engine.step()
            tokens += n
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
        step = index + 1
        extra = task.after_step(engine, step)
        seconds = time.perf_counter() - tic
        record = {k: _mean_over_ranks(v / (per_worker // micro)) for k, v in sums.items()}
        record.update(step=step, epoch=epoch, lr=lr, tokens_per_s=_sum_over_ranks(tokens) / seconds, step_s=seconds, **extra)
        if step % cfg.log_every == 0 or step == total_steps:
            log.write(record, total_steps)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            metrics = {k: _sum_over_ranks(total) / max(_sum_over_ranks(weight), 1e-12) for k, (total, weight) in task.evaluate(engine).items()}
            log.write({"step": step, **metrics}, total_steps, kind="validation")
            _checkpoint(engine, tokenizer, rank, {"step": step, **metrics}, fingerprint(cfg))
            log.push()
    log.close()


def _resume(engine) -> int:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(os.path.join(d, "ds"), tag="ds")
        return json.loads(Path(d, "state.json").read_text())["step"]


def _checkpoint(engine, tokenizer, rank: int, metrics: dict, config: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(os.path.join(d, "ds"), tag="ds")
        state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
        if rank == 0:
            engine.module.save_pretrained(os.path.join(d, "model"), state_dict=state_dict)
            tokenizer.save_pretrained(os.path.join(d, "model"))
            Path(d, "state.json").write_text(json.dumps({"step": metrics["step"], "config": config}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _mean_over_ranks(value: float) -> float:
    return _sum_over_ranks(value) / dist.get_world_size() if dist.is_initialized() else value


def _sum_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Log:
    """Rank 0 writes metrics.jsonl, TensorBoard (when installed) and one readable line per record,
    into the run's staging folder (train/outputs.py: the output itself when local), uploaded by `push`."""

    def __init__(self, output: RunOutput, rank: int, start: int):
        self.rank, self.output = rank, output
        self.file = self.tb = None
        if rank == 0:
            self.staged = output.staging()
            self.file = open(self.staged / METRICS, "a")
            self.tb = _tensorboard(self.staged / EVENTS)
        self.started = time.monotonic()

    def write(self, record: dict, total: int, kind: str = "train") -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"kind": kind, **record}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k not in ("step", "epoch"))
        print(f"[fescale train] {kind} step {record['step']}/{total}  {shown}", flush=True)

    def push(self) -> None:
        if self.rank != 0:
            return
        if self.tb is not None:
            self.tb.flush()
        self.output.push(self.staged)

    def close(self) -> None:
        self.push()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(logdir: Path):
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            return importlib.import_module(module).SummaryWriter(str(logdir))
        except ImportError:
            continue
    return None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
