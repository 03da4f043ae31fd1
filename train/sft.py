"""Causal-LM SFT (feedback-sft, edit-sft, distill-sft): loss on the response tokens only.

Items are tokenized examples `{input_ids, labels}` (labels -100 over the prompt, train.tokens). The
loss is the mean cross-entropy over a micro-batch's response tokens; validation reports `val_loss`,
averaged over every validation token, and checkpoints are ranked by it (lowest kept).
"""

from __future__ import annotations

import torch

from actors.models import resolve_model
from train.loop import TaskBase, chunk_steps, order
from train.tokens import IGNORE, pad_right


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
