"""Examples -> token ids through the model's own chat template, as the engine renders them.

SFT: the prompt rendered with the generation prompt, then the response turn; labels are -100 over
the prompt so the loss is on the response (and its end-of-turn token) only. Reward model: the whole
conversation ending with the response, as `ChatFormatter.conversation_ids` renders it for the
engine's scorers (the Edit RM's conversation is the edit conversation, train.prepare.edit_prompt).
Examples longer than `max_len` are dropped and counted; SFT examples may then be packed (`pack_sft`).
"""

from __future__ import annotations

import torch

from actors.chat_format import ChatFormatter
from train.prepare import Drops, PreferenceTuple, SFTExample

IGNORE = -100


def sft_ids(fmt: ChatFormatter, ex: SFTExample) -> dict:
    prompt_text = fmt.prompt_text(ex.prompt)
    full_text = fmt.tokenizer.apply_chat_template([*ex.prompt, {"role": "assistant", "content": ex.response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"the chat template of {fmt.tokenizer.name_or_path!r} does not render the prompt as a prefix of the "
            "conversation (it rewrites earlier turns); SFT masking needs a template that only appends"
        )
    prompt_ids = fmt.encode(prompt_text)
    response_ids = fmt.encode(full_text[len(prompt_text) :])
    return {"id": ex.id, "input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}


def pack_sft(items: list[dict], max_len: int) -> list[dict]:
    """SFT examples concatenated, in order, into sequences of at most `max_len` tokens.

    Padding short examples up to the longest of a batch wastes most of a batch's compute when lengths
    vary; packing fills each row instead. `position_ids` restart at 0 for every example: transformers
    reads a restart as a document boundary and masks attention across it (block-diagonal causal mask
    for eager/sdpa, varlen for flash attention), so each example sees only itself. The first label of
    every example is ignored: unpacked, nothing predicts it; packed, the previous example's last token
    would. So the loss is the unpacked loss over the same tokens. Greedy in order (linear time, and a
    prompt's examples stay together); the steps shuffle whole packed sequences.
    """
    packed: list[dict] = []
    for item in items:
        n = len(item["input_ids"])
        if not packed or len(packed[-1]["input_ids"]) + n > max_len:
            packed.append({"ids": [], "input_ids": [], "labels": [], "position_ids": []})
        row = packed[-1]
        row["ids"].append(item["id"])
        row["input_ids"] += item["input_ids"]
        row["labels"] += [IGNORE, *item["labels"][1:]]
        row["position_ids"] += range(n)
    return packed


def rm_ids(fmt: ChatFormatter, context: list[dict], response: str) -> list[int]:
    return fmt.encode(fmt.tokenizer.apply_chat_template([*context, {"role": "assistant", "content": response}], tokenize=False))


def tokenize_sft(fmt: ChatFormatter, examples: list[SFTExample], max_len: int, drops: Drops) -> list[dict]:
    out = []
    for ex in examples:
        item = sft_ids(fmt, ex)
        if len(item["input_ids"]) > max_len:
            drops.add(f"longer than max_seq_len={max_len}")
            continue
        out.append(item)
    return out


def tokenize_preferences(fmt: ChatFormatter, tuples: list[PreferenceTuple], max_len: int, drops: Drops) -> list[dict]:
    """Per tuple: the good, bad and original (no edit) responses as three RM sequences."""
    out = []
    for t in tuples:
        seqs = {name: rm_ids(fmt, t.context, text) for name, text in (("good", t.good), ("bad", t.bad), ("original", t.original))}
        if max(len(s) for s in seqs.values()) > max_len:
            drops.add(f"longer than max_seq_len={max_len}")
            continue
        out.append({"id": t.id, "key": t.key, **seqs})
    return out


def pad_right(sequences: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of right-padded sequences: the batch shape every training forward uses."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)
