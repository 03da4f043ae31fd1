"""Causal-LM SFT (feedback-sft, edit-sft, distill-sft): loss on the response tokens only.

Items are tokenized examples `{input_ids, labels}` (labels -100 over the prompt, train.tokens). The
loss is the mean cross-entropy over a micro-batch's response tokens; validation reports `val_loss`,
averaged over every validation token, and checkpoints are ranked by it (lowest kept).

The three stages train the same way and differ only in where their examples come from, so they are
one `SFTRecipe` each, given the function that builds their (train, validation) examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from actors.chat_format import ChatFormatter
from actors.models import resolve_model
from train import data, prepare
from train.config import TrainConfig
from train.loop import TaskBase, chunk_steps, order
from train.recipe import Recipe, Sources
from train.tokens import IGNORE, pad_right, tokenize_sft

Examples = tuple[list[prepare.SFTExample], list[prepare.SFTExample]]


class SFTTask(TaskBase):
    metric, mode = "val_loss", "min"

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(resolve_model(self.cfg.model), dtype=self.dtype)

    def steps(self, epoch_seed: int) -> list[list[dict]]:
        return chunk_steps(order(self.train, epoch_seed), self.cfg.optim.global_batch_size)

    def loss(self, engine, items: list[dict]):
        input_ids, labels, mask = collate(items, self.pad_id, engine.device)
        out = engine(input_ids=input_ids, attention_mask=mask, labels=labels)
        return out.loss, {}, int(mask.sum())

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        engine.eval()
        mine = self.validation_share()
        total, count = 0.0, 0
        for i in range(0, len(mine), self.cfg.optim.micro_batch_size):
            input_ids, labels, mask = collate(mine[i : i + self.cfg.optim.micro_batch_size], self.pad_id, engine.device)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(engine(input_ids=input_ids, attention_mask=mask, labels=labels).loss) * n
            count += n
        return {"val_loss": (total, count)}


def collate(items: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels, attention_mask); padding is masked out of the loss."""
    ids, mask = pad_right([it["input_ids"] for it in items], pad_id, device)
    labels, _ = pad_right([it["labels"] for it in items], IGNORE, device)
    return ids, labels, mask


@dataclass(frozen=True)
class SFTRecipe(Recipe):
    """An SFT stage: its `examples` (train, validation), tokenized and length-filtered the same way."""

    task: type = SFTTask
    examples: Callable[[TrainConfig, Sources], Examples] = field(kw_only=True)

    def prepare(self, cfg: TrainConfig, fmt: ChatFormatter, sources: Sources) -> tuple[list, list]:
        return tuple(tokenize_sft(fmt, examples, cfg.data.max_seq_len, sources.drops) for examples in self.examples(cfg, sources))


def feedback_examples(cfg: TrainConfig, sources: Sources) -> Examples:
    """Feedback Demonstrations from the `feedback` subset."""
    d = cfg.data
    return tuple(prepare.feedback_demonstrations(rows, sources.drops, d.max_level_spread, d.feedback_targets, cfg.seed) for rows in sources.splits("feedback"))


def edit_examples(cfg: TrainConfig, sources: Sources) -> Examples:
    """Edit Demonstrations from the `edit` subset, checked by a model when `data.applied_check` is set."""
    d = cfg.data
    applied = prepare.applied_feedback(d.applied_check, cfg.seed) if d.applied_check else None
    return tuple(prepare.edit_demonstrations(rows, sources.drops, applied, d.joiner) for rows in sources.splits("edit"))


def distill_examples(cfg: TrainConfig, sources: Sources) -> Examples:
    """The final answers `fescale distill` wrote; split after conversion, as they have no validation file."""
    d = cfg.data
    examples = prepare.distill_examples(data.load_distill(d.distill)[: d.limit])
    sources.rows["distill"] = len(examples)
    return prepare.split_rows(examples, d.validation_fraction, cfg.seed)


RECIPES = (
    SFTRecipe("feedback-sft", examples=feedback_examples),
    SFTRecipe("edit-sft", examples=edit_examples),
    SFTRecipe("distill-sft", examples=distill_examples),
)
