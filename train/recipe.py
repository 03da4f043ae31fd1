"""What a training stage declares, so `train/runner.py` runs every stage the same way.

A stage is one `Recipe`, defined next to its Task (train/sft.py, train/reward_model.py, train/rloo.py)
and registered by name in train/stages.py. The runner asks the recipe, never the stage name, for:
- its data: `prepare` turns HelpSteer3 (or distilled) rows, read through a `Sources`, into the
  train and validation items the Task consumes;
- its step: `items_per_step` reads the config key `batch_key` (also what the error for too little
  data tells the user to lower), `steps_per_epoch` how many optimizer steps an epoch holds;
- what runs beside the training workers: `reserved_cpus` (sizes the local Ray cluster) and `extras`,
  a context manager that starts it and yields the keyword arguments passed to every worker's Task;
- its Task class, which also names the validation metric checkpoints are ranked by (`metric`, `mode`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from typing import Iterator

from actors.chat_format import ChatFormatter
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

    `task` is the per-worker Task class, built as `task(cfg, train, validation, pad_id, **extras)`;
    `batch_key` the dotted TrainConfig key that sets the items of one optimizer step."""

    name: str
    task: type[Task]
    batch_key: str = "optim.global_batch_size"

    @abstractmethod
    def prepare(self, cfg: TrainConfig, fmt: ChatFormatter, sources: Sources) -> tuple[list, list]:
        """(train items, validation items), on the driver before any worker starts."""

    def items_per_step(self, cfg: TrainConfig) -> int:
        return reduce(getattr, self.batch_key.split("."), cfg)

    def steps_per_epoch(self, cfg: TrainConfig, train: list) -> int:
        """Full steps only (the Task drops a last partial one)."""
        return len(train) // self.items_per_step(cfg)

    def reserved_cpus(self, cfg: TrainConfig) -> float:
        """Logical CPUs of what `extras` starts (the training workers' own are the runner's to count)."""
        return 0.0

    @contextmanager
    def extras(self, cfg: TrainConfig) -> Iterator[dict]:
        """Start what the workers use beside their own model (for the whole run) and yield the Task's
        extra keyword arguments; nothing by default."""
        yield {}
