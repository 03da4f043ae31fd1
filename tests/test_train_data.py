"""HelpSteer3 loading and the paper's preparation: pure functions, checked exactly (no Ray, no training)."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from actors.errors import ConfigError, InputError
from train import data, prepare
from train.config import load_train_config
from train.losses import bradley_terry, rloo_advantages, sequence_logprobs
from train.reward_model import rm_steps

FIXTURES = SHARED / "fixtures" / "helpsteer3"
F = {lv: f"The response is {lv} helpful. It could improve." for lv in ("not", "slightly", "partially", "mostly", "perfectly")}


def write_subset(root: Path, subset: str, rows: list, split: str = "train") -> Path:
    path = root / subset / f"{split}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def edit_row(feedback, domain="general", **extra):
    return {"domain": domain, "language": "english", "context": [{"role": "user", "content": "Q?"}], "original_response": "A.",
            "edited_response": "A, better.", "feedback": feedback, "change_summary": "Added detail.", **extra}


def test_published_fixtures_load_with_every_subset():
    for subset in ("preference", "feedback", "edit", "edit_quality"):
        splits = data.load_subset(FIXTURES, subset)
        assert set(splits) == {"train", "validation"} and splits["train"]
        assert all(row["_line"] >= 1 and row["context"][-1]["role"] == "user" for row in splits["train"])


@pytest.mark.parametrize(
    "row, field",
    [
        ({k: v for k, v in edit_row([F["mostly"]]).items() if k != "edited_response"}, "missing field `edited_response`"),
        (edit_row("not a list"), "field `feedback` must be a non-empty list"),
        (edit_row([]), "field `feedback` must be a non-empty list"),
        (edit_row([F["mostly"], 3]), "field `feedback` must be a non-empty list"),
        (edit_row([F["mostly"]], domain="law"), "field `domain` must be one of"),
        ({**edit_row([F["mostly"]]), "context": [{"role": "user", "content": 5}]}, "`context[0].content` must be a non-empty string"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_row_names_file_line_and_field(tmp_path, row, field):
    path = write_subset(tmp_path, "edit", [edit_row([F["mostly"]]), row])
    with pytest.raises(InputError) as e:
        data.load_subset(tmp_path, "edit")
    assert f"{path}:2: " in str(e.value) and field in str(e.value) and "1 malformed row(s)" in str(e.value)


def test_a_missing_subset_says_what_layout_is_expected(tmp_path):
    with pytest.raises(InputError, match=r"edit/train.jsonl.gz does not exist.*<subset>/train.jsonl.gz"):
        data.load_subset(tmp_path, "edit")


def test_feedback_demonstrations_drop_strong_disagreement_and_keep_every_feedback():
    rows = [
        {"_source": "f", "_line": 1, "context": [{"role": "user", "content": "Q"}], "response1": "R1", "response2": "R2",
         "feedback1": [F["mostly"], F["partially"], F["mostly"]], "feedback2": [F["perfectly"], F["slightly"], "No template here."]},
    ]
    drops = prepare.Drops()
    out = prepare.feedback_demonstrations(rows, drops, max_level_spread=2)
    assert [ex.response for ex in out] == [F["mostly"], F["partially"], F["mostly"]]  # response2: perfectly vs slightly
    assert out[0].prompt[-2] == {"role": "assistant", "content": "R1"} and out[0].prompt[-1]["content"].startswith("Evaluate the response")
    assert drops.as_dict() == {"feedback not in the template's form": 1, "feedbacks disagree (level spread > 2)": 1}
    one = prepare.feedback_demonstrations(rows, prepare.Drops(), max_level_spread=3, targets="one")
    assert len(one) == 2


def test_edit_demonstrations_one_example_per_permutation_without_perfect_feedback():
    rows = [{**edit_row([F["partially"], F["perfectly"], F["mostly"]]), "_source": "e", "_line": 1},
            {**edit_row([F["perfectly"]]), "_source": "e", "_line": 2}]
    drops = prepare.Drops()
    out = prepare.edit_demonstrations(rows, drops)
    instructions = [ex.prompt[-1]["content"] for ex in out]
    header = "Edit the response to the previous prompt based on the following feedback:"
    assert instructions == [
        "\n".join([header, F["partially"], F["mostly"], "<None>"]),
        "\n".join([header, F["mostly"], F["partially"], "<None>"]),
    ]
    assert {ex.response for ex in out} == {"A, better."}
    assert drops.as_dict() == {'"perfectly helpful" feedback': 2, "edit rows with no feedback left": 1}
    three = prepare.edit_demonstrations([{**edit_row([F["not"], F["slightly"], F["mostly"]]), "_source": "e", "_line": 3}], prepare.Drops())
    assert len(three) == 6 and len({ex.prompt[-1]["content"] for ex in three}) == 6


def test_edit_demonstrations_drop_feedback_the_change_summary_does_not_address():
    rows = [{**edit_row([F["partially"], F["mostly"], F["not"]]), "_source": "e", "_line": 1}]
    asked = []

    def applied(pairs):
        asked.extend(pairs)
        return [f != F["mostly"] for _, f in pairs]

    drops = prepare.Drops()
    out = prepare.edit_demonstrations(rows, drops, applied)
    assert asked == [("Added detail.", F["partially"]), ("Added detail.", F["mostly"]), ("Added detail.", F["not"])]
    assert len(out) == 2 and all(F["mostly"] not in ex.prompt[-1]["content"] for ex in out)
    assert drops.as_dict() == {"feedback not addressed by the change summary": 1}


def test_edit_preferences_keep_general_and_stem():
    row = {"_source": "q", "context": [{"role": "user", "content": "Q"}], "original_response": "O", "good_edited_response": "G",
           "bad_edited_response": "B", "feedback": [F["mostly"]]}
    rows = [{**row, "_line": i, "domain": d} for i, d in enumerate(["general", "stem", "code", "multilingual"])]
    drops = prepare.Drops()
    out = prepare.edit_preferences(rows, drops)
    assert [t.id for t in out] == ["q:0", "q:1"] and (out[0].good, out[0].bad, out[0].original) == ("G", "B", "O")
    assert drops.as_dict() == {"domain not in ['general', 'stem']": 2}


def test_edit_rm_reads_the_edit_conversation_then_the_edit(embedded_dir):
    """The paper's Edit RM ranks edits of one (prompt, initial response, feedback) tuple: each of its
    training sequences is the edit conversation the editor sees, then the edit (or the original)."""
    from transformers import AutoTokenizer

    from actors.chat_format import ChatFormatter
    from train.tokens import tokenize_preferences

    row = {"_source": "q", "_line": 1, "domain": "stem", "context": [{"role": "user", "content": "What causes tides?"}],
           "original_response": "The wind.", "good_edited_response": "Mainly the Moon's gravity.", "bad_edited_response": "Strong winds.",
           "feedback": [F["not"], F["perfectly"], "The response is slightly helpful. It lacks the Moon."]}
    drops = prepare.Drops()
    (t,) = prepare.edit_preferences([row], drops)
    header = "Edit the response to the previous prompt based on the following feedback:"
    assert t.context == [*row["context"], {"role": "assistant", "content": "The wind."},
                         {"role": "user", "content": "\n".join([header, F["not"], row["feedback"][2], "<None>"])}]
    assert drops.as_dict() == {'"perfectly helpful" feedback': 1}  # as the editor: no "perfectly helpful" feedback
    fmt = ChatFormatter(AutoTokenizer.from_pretrained(embedded_dir), 4096)
    (item,) = tokenize_preferences(fmt, [t], 4096, prepare.Drops())
    for name, edit in (("good", "Mainly the Moon's gravity."), ("bad", "Strong winds."), ("original", "The wind.")):
        text = fmt.tokenizer.decode(item[name])
        assert "What causes tides?" in text and "The wind." in text and F["not"] in text and "It lacks the Moon." in text
        assert text.rstrip().removesuffix("<|im_end|>").endswith(edit)  # the edit comes after the whole edit conversation
        assert text.index("It lacks the Moon.") < text.rindex(edit)
    assert item["key"] == prepare.edit_preferences([{**row, "good_edited_response": "Other."}], prepare.Drops())[0].key  # same tuple


def test_rloo_rewards_score_the_edit_conversation_then_the_rollout(embedded_dir):
    """RLOO's reward is the Edit RM on what it was trained on: the edit conversation, then the rollout."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from actors.chat_format import ChatFormatter
    from train.recipe import Sources
    from train.rloo import RLOOTask
    from train.stages import RECIPES

    cfg = load_train_config("edit-rloo", "edit-rloo", [f"data.dir={FIXTURES}"])
    train, _ = RECIPES["edit-rloo"].prepare(cfg, None, Sources(cfg))

    class Recorder(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            self.seen = input_ids
            return SimpleNamespace(logits=attention_mask.sum(-1, keepdim=True).float())

    fmt = ChatFormatter(AutoTokenizer.from_pretrained(embedded_dir), 4096)
    task = RLOOTask(cfg, train, [], fmt.tokenizer.pad_token_id)
    task.fmt, task.reward = fmt, Recorder()
    task._rewards(train[:1], [["An edit.", "Another edit."]], "cpu")
    texts = [fmt.tokenizer.decode(ids) for ids in task.reward.seen]
    row = data.load_subset(FIXTURES, "edit_quality")["train"][0]
    for text, edit in zip(texts, ["An edit.", "Another edit."]):
        assert row["context"][0]["content"] in text and row["original_response"] in text
        assert all(f in text for f in row["feedback"]) and text.index(row["feedback"][-1]) < text.rindex(edit)


def test_rloo_prompts_are_the_edit_preference_set():
    """The paper's RLOO: 47 steps x 64 = 3,008 prompts, the Edit Preference set. The fixtures'
    edit_quality holds 2 train rows (general, stem) and 1 validation row (general), edit 3 + 1."""
    from train.recipe import Sources
    from train.stages import RECIPES

    for domains, train_n in (("[general, stem]", 2), ("[general]", 1)):
        cfg = load_train_config("edit-rloo", "edit-rloo", [f"data.dir={FIXTURES}", f"data.domains={domains}"])
        sources = Sources(cfg)
        train, val = RECIPES["edit-rloo"].prepare(cfg, None, sources)
        assert (len(train), len(val)) == (train_n, 1)
        assert sources.rows == {"edit_quality/train": 2, "edit_quality/validation": 1}  # not the `edit` subset
        rm = load_train_config("edit-rm", "edit-rm", [f"data.dir={FIXTURES}", f"data.domains={domains}"])
        tuples = [prepare.edit_preferences(rows, prepare.Drops(), rm.data.domains) for rows in Sources(rm).splits("edit_quality")]
        assert [[it["prompt"] for it in split] for split in (train, val)] == [[t.context for t in split] for split in tuples]


def test_split_is_seeded_95_5_and_disjoint():
    rows = list(range(200))
    train, val = prepare.split_rows(rows, 0.05, seed=3)
    assert len(val) == 10 and sorted(train + val) == rows
    assert prepare.split_rows(rows, 0.05, seed=3) == (train, val) and prepare.split_rows(rows, 0.05, seed=4)[1] != val


def test_rm_steps_hold_distinct_tuples_and_two_pairs_each():
    items = [{"id": i, "key": f"k{i % 5}"} for i in range(10)]  # every tuple twice, with different edits
    steps = rm_steps(items, per_step=4, seed=0)
    assert len(steps) == 2 and all(len({it["key"] for it in step}) == 4 for step in steps)
    assert rm_steps(items, per_step=4, seed=0) == steps  # seeded
    assert rm_steps(items, per_step=6, seed=0) == []  # only 5 distinct tuples: no full step
    from train.reward_model import PAIRS

    assert PAIRS == (("good", "bad"), ("good", "original"))  # (chosen, rejected): bad edit and no edit, 1:1


def test_sft_tokens_mask_the_prompt(embedded_dir):
    from transformers import AutoTokenizer

    from actors.chat_format import ChatFormatter
    from train.tokens import IGNORE, sft_ids

    fmt = ChatFormatter(AutoTokenizer.from_pretrained(embedded_dir), 4096)
    ex = prepare.SFTExample("x", [{"role": "user", "content": "Hi"}], "Hello there")
    item = sft_ids(fmt, ex)
    prompt_len = len(fmt.prompt_ids(ex.prompt))
    assert item["labels"][:prompt_len] == [IGNORE] * prompt_len
    assert fmt.tokenizer.decode(item["labels"][prompt_len:]).startswith("Hello there<|im_end|>")
    assert item["input_ids"][:prompt_len] == fmt.prompt_ids(ex.prompt)


def test_rloo_advantages_and_losses_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # rollout i: r_i - mean of the other two
    assert rloo_advantages(rewards).tolist() == [[1 - 4, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0]]
    loss, acc = bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    expected = (-torch.nn.functional.logsigmoid(torch.tensor(2.0)) - torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
    assert torch.isclose(loss, expected) and acc == 0.5
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    ids, mask = torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 1]])
    assert torch.isclose(sequence_logprobs(logits, ids, mask), torch.log(torch.tensor(0.5 * 0.25)))


def test_training_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key `optim.warmup_step`; did you mean `warmup_steps`"):
        load_train_config("edit-sft", "edit-sft", ["optim.warmup_step=5"])
    with pytest.raises(ConfigError, match="edit-rloo needs `rloo.reward_model`"):
        load_train_config("edit-sft", None, ["stage=edit-rloo"])
    with pytest.raises(ConfigError, match="is a config for stage 'edit-sft', not 'edit-rm'"):
        load_train_config("edit-sft", "edit-rm")
    cfg = load_train_config("edit-rm", "edit-rm")
    assert (cfg.lr, cfg.rm.tuples_per_step, cfg.optim.warmup_steps, cfg.optim.epochs) == (3e-6, 32, 10, 1)
    assert load_train_config("edit-rloo", "edit-rloo").lr == 5e-7


def test_the_paper_preset_runs_the_applied_feedback_check():
    from train.config import TRAIN_CONFIGS

    paper = load_train_config(str(TRAIN_CONFIGS / "70b" / "edit-sft.yaml"), "edit-sft").data.applied_check
    assert paper is not None and paper.model == "/models/Llama-3.3-70B-Instruct" and paper.backend == "vllm"
    small = TRAIN_CONFIGS / "edit-sft.yaml"
    assert load_train_config(str(small), "edit-sft").data.applied_check is None and "costs too much" in small.read_text()
