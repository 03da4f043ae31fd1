"""Edit RLOO (edit-rloo): REINFORCE Leave-One-Out on the Edit SFT policy, guided by the Edit RM.

Per step, `rollout_batch_size` edit conversations (prompt, original response, feedback: the Edit SFT
prompt) each get `rollouts_per_prompt` edits sampled by an engine pool (HF on CPU, vLLM on GPU) at
T=1, top_p 0.9. Each edit's reward is the Edit RM's score of (edit conversation, edit), the input it
was trained on, minus `kl_coef` times the sequence KL to the frozen reference (the starting policy);
its advantage is its reward minus the mean of the other rollouts of the same prompt; the loss is
-advantage x log p(edit). After every optimizer step rank 0 pushes the new weights into the rollout
replicas (`update_weights`, an in-memory load: no checkpoint round trip), and every rank waits for it
before sampling again.
Validation: the mean RM reward of greedy edits on the validation prompts (`val_reward`, highest kept).
`RECIPE` makes it a stage: the prompts are the Edit Preference tuples (`edit_quality`, `data.domains`,
the paper's 47 steps x 64 = 3,008 prompts), and the rollout pool runs beside the training workers
for the whole run.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from typing import Iterator

import ray
import torch
import torch.distributed as dist

from actors.backend import ChatRequest, Sampling
from actors.chat_format import ChatFormatter
from actors.errors import ConfigError
from actors.models import resolve_model
from train import prepare
from train.config import TrainConfig
from train.loop import Shard, TaskBase
from train.losses import rloo_advantages, sequence_logprobs
from train.prepare import SFTExample
from train.recipe import Recipe, Sources
from train.tokens import IGNORE, pad_right, rm_ids, sft_ids


class RLOOTask(TaskBase):
    metric, mode = "val_reward", "max"

    def __init__(self, cfg, train: Shard, validation: Shard, pad_id: int, client=None, replicas=()):
        super().__init__(cfg, train, validation, pad_id)
        self.client, self.replicas = client, list(replicas)
        self.r = cfg.rloo

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        dtype = self.dtype
        path = resolve_model(self.cfg.model)
        self.fmt = ChatFormatter(AutoTokenizer.from_pretrained(path), self.cfg.data.max_seq_len)
        self.reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        self.reward = AutoModelForSequenceClassification.from_pretrained(resolve_model(self.r.reward_model, key="rloo.reward_model"), dtype=dtype).eval().requires_grad_(False)
        self.reward.config.pad_token_id = self.pad_id
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    def _sample(self, items: list[dict], n: int, temperature: float) -> list[list[str]]:
        sampling = Sampling(n=n, temperature=temperature, top_p=self.r.top_p if temperature > 0 else 1.0, max_tokens=self.r.max_tokens)
        results = asyncio.run(self.client.chat([ChatRequest(tuple(it["prompt"]), sampling) for it in items]))
        return [[c.text for c in r.completions] for r in results]

    @torch.no_grad()
    def _rewards(self, items: list[dict], edits: list[list[str]], device) -> torch.Tensor:
        seqs = [rm_ids(self.fmt, it["prompt"], e) for it, group in zip(items, edits) for e in group]
        ids, mask = pad_right(seqs, self.pad_id, device)
        return self.reward.to(device)(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()

    def loss(self, engine, items: list[dict]):
        k = self.r.rollouts_per_prompt
        edits = self._sample(items, k, self.r.temperature)
        examples = [sft_ids(self.fmt, SFTExample("", it["prompt"], e)) for it, group in zip(items, edits) for e in group]
        ids, attention = pad_right([ex["input_ids"] for ex in examples], self.pad_id, engine.device)
        completion, _ = pad_right([[int(t != IGNORE) for t in ex["labels"]] for ex in examples], 0, engine.device)
        logp = sequence_logprobs(engine(input_ids=ids, attention_mask=attention).logits, ids, completion)
        with torch.no_grad():
            ref_logp = sequence_logprobs(self.reference.to(engine.device)(input_ids=ids, attention_mask=attention).logits, ids, completion)
        score = self._rewards(items, edits, engine.device)
        kl = (logp.detach() - ref_logp).float()
        advantages = rloo_advantages((score - self.r.kl_coef * kl).view(len(items), k)).flatten()
        loss = -(advantages * logp).mean()
        return loss, {"reward": float(score.mean()), "kl": float(kl.mean())}, int(attention.sum())

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, tuple[float, float]]:
        total = count = 0.0
        for items in self.validation.batches(self.r.rollout_batch_size):  # one engine batch per rollout batch
            scores = self._rewards(items, self._sample(items, 1, 0.0), engine.device)
            total, count = total + float(scores.sum()), count + len(scores)
        return {"val_reward": (total, count)}

    def after_step(self, engine, step: int) -> dict[str, float]:
        """Push the updated policy into every rollout replica before anyone samples again; `sync_s`
        (the step's record) is what that costs, set against `step_s` in the README."""
        tic = time.perf_counter()
        zero3 = engine.zero_optimization_stage() == 3
        state = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
        if ray.train.get_context().get_world_rank() == 0:
            ref = ray.put([{name: t.detach().to("cpu", copy=True) for name, t in state.items()}])  # one copy for all replicas
            ray.get([replica.call.remote("update_weights", ref) for replica in self.replicas])
        if dist.is_initialized():
            dist.barrier()
        return {"sync_s": time.perf_counter() - tic}


class RLOORecipe(Recipe):
    def check(self, cfg: TrainConfig) -> None:
        """`rloo.reward_model` must give one score per sequence (a scalar head, as edit-rm writes); a
        model with more outputs (a causal LM loaded with a fresh classification head has 2) fails
        otherwise only inside the first step, on a training worker, as a tensor shape error."""
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(resolve_model(cfg.rloo.reward_model, key="rloo.reward_model")).num_labels
        if labels != 1:
            raise ConfigError(
                f"rloo.reward_model={cfg.rloo.reward_model} has {labels} outputs per sequence; RLOO needs a reward model "
                "with one (a scalar head, as `fescale train edit-rm` writes)"
            )

    def prepare(self, cfg: TrainConfig, fmt: ChatFormatter, sources: Sources) -> tuple[list, list]:
        """Edit conversations, not token ids: the policy's edits of them are sampled during training."""
        d = cfg.data
        return tuple(
            [{"id": t.id, "prompt": t.context} for t in prepare.edit_preferences(rows, sources.drops, d.domains, d.joiner)]
            for rows in sources.splits("edit_quality")
        )

    def reserved_cpus(self, cfg: TrainConfig) -> float:
        return cfg.rloo.rollout.num_cpus * cfg.rloo.rollout.replicas

    @contextmanager
    def extras(self, cfg: TrainConfig) -> Iterator[dict]:
        """The engine pool that samples rollouts, its model the policy's starting point; every worker's
        RLOOTask gets its client (to sample) and its replicas (to push new weights into)."""
        from engine.pools import role_pools

        with role_pools(cfg.rloo.rollout.model_copy(update={"model": cfg.model}), cfg.seed) as pools:
            (replicas,) = pools.replicas.values()
            yield {"client": pools.client("generator"), "replicas": list(replicas)}


RECIPE = RLOORecipe("edit-rloo", RLOOTask, batch_key="rloo.rollout_batch_size")
