"""Causal-LM SFT (feedback-sft, edit-sft, distill-sft): loss on the response tokens only.

Items are tokenized examples `{input_ids, labels}` (labels -100 over the prompt, train.tokens). The
loss is the mean cross-entropy over a micro-batch's response tokens; validation reports `val_loss`,
averaged over every validation token, and checkpoints are ranked by it (lowest kept).
"""

from __future__ import annotations

import torch

from actors.models import resolve_model
from train.loop import chunk_steps, order
from train.tokens import IGNORE, pad_right


class SFTTask:
    metric, mode = "val_loss", "min"

    def __init__(self, cfg, train: list[dict], validation: list[dict], pad_id: int):
        self.cfg, self.train, self.validation, self.pad_id = cfg, train, validation, pad_id

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if self.cfg.resources.use_gpu else torch.float32
        return AutoModelForCausalLM.from_pretrained(resolve_model(self.cfg.model), dtype=dtype)

    def steps(self, epoch_seed: int) -> list[list[dict]]:
        return chunk_steps(order(self.train, epoch_seed), self.cfg.optim.global_batch_size)

    def loss(self, engine, items: list[dict]):
        input_ids, labels, mask = collate(items, self.pad_id, engine.device)
        out = engine(input_ids=input_ids, attention_mask=mask, labels=labels)
        return out.loss, {}, int(mask.sum())

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        import ray.train

        engine.eval()
        ctx = ray.train.get_context()
        mine = self.validation[ctx.get_world_rank() :: ctx.get_world_size()]
        total, count = 0.0, 0
        for i in range(0, len(mine), self.cfg.optim.micro_batch_size):
            input_ids, labels, mask = collate(mine[i : i + self.cfg.optim.micro_batch_size], self.pad_id, engine.device)
            n = int((labels[:, 1:] != IGNORE).sum())
            total += float(engine(input_ids=input_ids, attention_mask=mask, labels=labels).loss) * n
            count += n
        return {"val_loss": (total, count)}

    def after_step(self, engine, step: int) -> None:
        return None


def collate(items: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels, attention_mask); padding is masked out of the loss."""
    ids, mask = pad_right([it["input_ids"] for it in items], pad_id, device)
    labels, _ = pad_right([it["labels"] for it in items], IGNORE, device)
    return ids, labels, mask
