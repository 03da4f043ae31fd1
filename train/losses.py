"""The losses and estimators of the training stages, pure tensor code (tested by hand-computed cases)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean -log sigmoid(chosen - rejected), accuracy): the pairwise loss of a scalar reward model."""
    margin = chosen.float() - rejected.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out: each rollout's reward minus the mean reward of the others of its prompt.

    rewards: [prompts, k] with k >= 2 rollouts per prompt.
    """
    k = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the positions `mask` marks (the completion), per sequence.

    logits [b, t, v] predict input_ids shifted by one; mask [b, t] marks the tokens to score.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)
