"""Render chats to token ids with the model's own chat template (HF and vLLM backends share it).

Rendering ourselves (rather than letting each engine do it) makes both local backends see the
same tokens, count the same prompt tokens and support an assistant-turn prefix the same way.
"""

from __future__ import annotations

from typing import Sequence

from actors.errors import ContextLengthError


class ChatFormatter:
    def __init__(self, tokenizer, max_model_len: int):
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; fescale needs a chat model")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def prompt_text(self, messages: Sequence[dict], prefix: str = "") -> str:
        """The chat up to the assistant's turn (generation prompt), followed by `prefix`."""
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True) + prefix

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, messages: Sequence[dict], prefix: str = "") -> list[int]:
        return self.checked(self.encode(self.prompt_text(messages, prefix)))

    def checked(self, ids: list[int]) -> list[int]:
        """Prompt ids that leave room for at least one new token, else a per-request error."""
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens, the model's context is {self.max_model_len}; "
                "shorten the prompt or raise the role's max_model_len"
            )
        return ids

    def conversation_ids(self, messages: Sequence[dict]) -> list[int]:
        """A whole conversation, ending with its last turn (what a classifier head scores)."""
        ids = self.encode(self.tokenizer.apply_chat_template(list(messages), tokenize=False))
        if len(ids) > self.max_model_len:
            raise ContextLengthError(f"conversation is {len(ids)} tokens, the model's context is {self.max_model_len}")
        return ids

    def choice_token_ids(self, prompt_text: str, prompt_ids: list[int], choices: Sequence[str]) -> list[int]:
        """The first token each choice would add right after the prompt (tokenized in context)."""
        out = []
        for choice in choices:
            full = self.encode(prompt_text + choice)
            if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
                out.append(full[len(prompt_ids)])
            else:  # the choice merged with the prompt's last token; fall back to its own first token
                out.append(self.encode(choice)[0])
        if len(set(out)) != len(out):
            raise ValueError(f"choices {list(choices)} do not start with distinct tokens; scores would be ambiguous")
        return out

    def room(self, prompt_len: int, max_tokens: int) -> int:
        """max_tokens, clamped so prompt + completion fit the context (as vLLM does)."""
        return min(max_tokens, self.max_model_len - prompt_len)
