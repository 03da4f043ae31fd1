"""What a training stage declares, so `train/runner.py` runs every stage the same way.

A stage is one `Recipe`, defined next to its Task (train/sft.py, train/reward_model.py, train/rloo.py)
and registered by name in train/stages.py. The runner asks the recipe, never the stage name, for:
- what it needs besides data, checked before any work (`check`: RLOO's reward model);
- its data: `prepare` turns HelpSteer3 (or distilled) rows, read through a `Sources`, into the
  train and validation items the Task consumes;
- its step: `items_per_step` reads the config key `batch_key` (also what the error for too little
  data tells the user to lower), `steps` groups an epoch's items into optimizer steps (seeded per
  epoch) and `schedule` strings epochs into the run's steps, both on the driver, which then hands
  every worker only its part of each step (train/runner.py `shard_datasets`);
- what runs beside the training workers: `reserved_cpus` (sizes the local Ray cluster) and `extras`,
  a context manager that starts it and yields the keyword arguments passed to every worker's Task;
- its Task class, which also names the validation metric checkpoints are ranked by (`metric`, `mode`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from typing import Iterator

from actors.chat_format import ChatFormatter
from actors.errors import ConfigError
from train import data, prepare
from train.config import TrainConfig
from train.loop import Task


class Sources:
    """The rows a recipe prepares from: loads and splits them, and records what the data report shows.

    Every recipe counts its drops in the one `drops`, and its source rows in `rows` (`splits` does it
    for HelpSteer3 subsets; a recipe reading another source adds its own count)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rows: dict[str, int] = {}
        self.drops = prepare.Drops()

    def splits(self, subset: data.Subset) -> tuple[list[dict], list[dict]]:
        """(train, validation) rows of a HelpSteer3 subset; split off (seeded) when it has no validation file."""
        d = self.cfg.data
        loaded = data.load_subset(d.dir, subset)
        train, val = loaded["train"][: d.limit], loaded.get("validation", [])[: d.limit]
        if "validation" not in loaded:
            train, val = prepare.split_rows(train, d.validation_fraction, self.cfg.seed)
        self.rows.update({f"{subset}/train": len(train), f"{subset}/validation": len(val)})
        return train, val


@dataclass(frozen=True)
class Recipe(ABC):
    """One training stage; subclasses implement `prepare` and override what differs from an SFT-like stage.

    `task` is the per-worker Task class, built as `task(cfg, train, validation, pad_id, **extras)` with
    this worker's shards (`train.loop.Shard`); `batch_key` the dotted TrainConfig key that sets the
    items of one optimizer step."""

    name: str
    task: type[Task]
    batch_key: str = "optim.global_batch_size"

    @abstractmethod
    def prepare(self, cfg: TrainConfig, fmt: ChatFormatter, sources: Sources) -> tuple[list, list]:
        """(train items, validation items), on the driver before any worker starts."""

    def items_per_step(self, cfg: TrainConfig) -> int:
        return reduce(getattr, self.batch_key.split("."), cfg)

    def steps(self, cfg: TrainConfig, train: list, epoch_seed: int) -> list[list]:
        """One epoch's items grouped into optimizer steps: a seeded order, full steps only (drop_last)."""
        return chunk_steps(order(train, epoch_seed), self.items_per_step(cfg))

    def steps_per_epoch(self, cfg: TrainConfig, train: list) -> int:
        return len(self.steps(cfg, train, cfg.seed))

    def schedule(self, cfg: TrainConfig, train: list, total: int) -> Iterator[tuple[int, list]]:
        """(epoch, items) of the run's first `total` steps, in order; epoch e is `steps(seed + e)`.

        It depends only on the items, the seed and the step size, never on `total` (which a rerun may
        raise), so step s is the same items on every run and a resumed run goes on where it stopped."""
        step, epoch = 0, 0
        while step < total:
            steps = self.steps(cfg, train, cfg.seed + epoch)
            if not steps:  # a seed can leave fewer full steps than the first epoch had (edit-rm's distinct tuples)
                raise ConfigError(f"{self.name}: epoch {epoch} makes no full step of {self.items_per_step(cfg)}; lower {self.batch_key} or add data")
            taken = steps[: total - step]
            yield from ((epoch, items) for items in taken)
            step, epoch = step + len(taken), epoch + 1

    def check(self, cfg: TrainConfig) -> None:
        """Refuse, with a ConfigError naming the key, what the stage needs besides its data and would
        otherwise fail on only inside a training worker; nothing by default."""

    def reserved_cpus(self, cfg: TrainConfig) -> float:
        """Logical CPUs of what `extras` starts (the training workers' own are the runner's to count)."""
        return 0.0

    @contextmanager
    def extras(self, cfg: TrainConfig) -> Iterator[dict]:
        """Start what the workers use beside their own model (for the whole run) and yield the Task's
        extra keyword arguments; nothing by default."""
        yield {}


def order(items: list, seed: int) -> list:
    """A seeded permutation of items (the same in every process and on every rerun)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def chunk_steps(items: list, per_step: int) -> list[list]:
    """Consecutive full steps of `per_step` items (a last partial step is left out, like drop_last)."""
    return [items[i : i + per_step] for i in range(0, len(items) - per_step + 1, per_step)]
