"""Causal-LM SFT (feedback-sft, edit-sft, distill-sft): loss on the response tokens only.

Items are tokenized examples `{input_ids, labels}` (labels -100 over the prompt, train.tokens), or
with `data.packing` several of them packed into one sequence (`{input_ids, labels, position_ids}`,
`train.tokens.pack_sft`). The loss is the mean cross-entropy over a micro-batch's response tokens,
the same packed or not; validation reports `val_loss`, averaged over every validation token, and
checkpoints are ranked by it (lowest kept).

The three stages train the same way and differ only in where their examples come from, so they are
one `SFTRecipe` each, given the function that builds their (train, validation) examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from actors.chat_format import ChatFormatter
from actors.models import resolve_model
from train import data, prepare
from train.config import TrainConfig
from train.loop import TaskBase
from train.recipe import Recipe, Sources
from train.tokens import IGNORE, pack_sft, pad_right, tokenize_sft

Examples = tuple[list[prepare.SFTExample], list[prepare.SFTExample]]


class SFTTask(TaskBase):
    metric, mode = "val_loss", "min"

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(resolve_model(self.cfg.model), **self.model_kwargs)

    def loss(self, engine, items: list[dict]):
        out = engine(**collate(items, self.pad_id, engine.device))
        return out.loss, {}, sum(len(it["input_ids"]) for it in items)

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        engine.eval()
        total, count = 0.0, 0
        for items in self.validation.batches(self.cfg.optim.micro_batch_size):
            batch = collate(items, self.pad_id, engine.device)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(engine(**batch).loss) * n
            count += n
        return {"val_loss": (total, count)}


def collate(items: list[dict], pad_id: int, device) -> dict[str, Any]:
    """A micro-batch as the model's keyword arguments, right-padded; padding is out of the loss.

    Packed rows carry `position_ids` and no attention mask: given no 2D mask, transformers derives the
    per-example causal mask from where the positions restart (padding, at a row's end, is seen by no
    real token). Without a KV cache, which would make transformers skip that derivation."""
    ids, mask = pad_right([it["input_ids"] for it in items], pad_id, device)
    labels, _ = pad_right([it["labels"] for it in items], IGNORE, device)
    if "position_ids" not in items[0]:
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    positions, _ = pad_right([it["position_ids"] for it in items], 0, device)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False}


@dataclass(frozen=True)
class SFTRecipe(Recipe):
    """An SFT stage: its `examples` (train, validation), tokenized and length-filtered the same way."""

    task: type = SFTTask
    examples: Callable[[TrainConfig, Sources], Examples] = field(kw_only=True)

    def prepare(self, cfg: TrainConfig, fmt: ChatFormatter, sources: Sources) -> tuple[list, list]:
        d = cfg.data
        splits = (tokenize_sft(fmt, examples, d.max_seq_len, sources.drops) for examples in self.examples(cfg, sources))
        return tuple(pack_sft(items, d.max_seq_len) if d.packing else items for items in splits)


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
