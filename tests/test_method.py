"""The method's pure parts: templates, level parsing, keyword rerank, feedback sets, guided levels."""

import random

import pytest

from engine import method, templates


@pytest.mark.parametrize(
    "text, level",
    [
        ("The response is perfectly helpful. It answers every part.", "perfectly"),
        ("The response is mostly helpful.", "mostly"),
        ("the response is NOT helpful at all", "not"),
        ("**The response is partially helpful.** It misses the second part.", "partially"),
        ('"The response is slightly helpful."', "slightly"),
        ("  \nThe  response is mostly  helpful.", "mostly"),
        ("The response is helpful but long.", None),  # no level word
        ("I think the response is mostly helpful.", None),  # does not start with the statement
        ("The response is very helpful.", None),
        ("", None),
    ],
)
def test_parse_level(text, level):
    assert method.parse_level(text) == level


def test_count_keywords_counts_the_papers_words_and_their_forms():
    text = "However, it lacks detail. It could improve; an improvement would benefit readers, but also lack of examples."
    # however, lacks, improve, improvement, benefit, but, lack
    assert method.count_keywords(text) == 7
    assert method.count_keywords("Butter and buttons.") == 0  # whole words only
    assert method.count_keywords("HOWEVER BUT") == 2


def test_count_keywords_matches_the_regex_it_replaced():
    """`count_keywords` once was this regex; on ordinary text (ASCII, common accented letters and
    typographic punctuation) the hand-written boundary checks must count exactly the same."""
    regex = pytest.importorskip("regex")
    reference = regex.compile(r"\b(?:however\b|improv|lack|benefi|but\b)", regex.IGNORECASE)
    words = ["however", "improv", "improve", "improvement", "lack", "lacks", "lacking", "benefi", "benefit",
             "beneficial", "but", "butter", "rebut", "however_x", "xhowever", "but_", "_but", "but9", "9lack",
             "unimproved", "blacks", "buthowever", "howeverbut", "lackbut", "benefitbut", "butlack", "bu", "howeve"]
    pieces = [*words, *"abcehilnortuvwxyzABKLT0123456789_", " ", "  ", "\n", "\t", *".,;:!?'\"()-/*#",
              "é", "É", "ü", "ß", "ñ", "’", "—", "“", "”", "中"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        text = "".join(c.upper() if rng.random() < 0.3 else c for c in text)  # mixed case: HOWEVER, Improvement, bUt
        assert method.count_keywords(text) == len(reference.findall(text)), text


@pytest.mark.parametrize(
    "original, edit, same",
    [
        ("Paris is the capital.", "Paris is the capital.", True),
        ("Paris is the capital.", "  Paris is\nthe   capital.\n", True),  # re-wrapped: no edit
        ("- a\n- b", "- a\n\n- b", True),
        ("Paris is the capital.", "Paris is the capital!", False),  # any changed character is an edit
        ("Paris is the capital.", "paris is the capital.", False),
        ("", "", True),
    ],
)
def test_a_no_edit_differs_only_in_whitespace(original, edit, same):
    assert method.no_edits(original, [edit]) == int(same)
    assert method.no_edits(original, [edit, original, edit + " more"]) == int(same) + 1  # counted per edit


def test_rank_drops_perfect_and_unparseable_and_orders_by_keywords_stably():
    levels = ["mostly", "perfectly", None, "not", "slightly", "partially"]
    keywords = [1, 9, 9, 3, 1, 3]
    assert method.rank_feedback(levels, keywords, None) == [3, 5, 0, 4]
    assert method.rank_feedback(levels, keywords, 2) == [3, 5]
    assert method.rank_feedback(["perfectly", None], [1, 1], None) == []


def test_form_sets_modes():
    ranked = [7, 3, 5, 1, 0, 2, 4]
    assert method.form_sets(ranked, "top", 3, random.Random(0)) == [[7, 3, 5]]
    assert method.form_sets(ranked, "partition", 3, random.Random(0)) == [[7, 3, 5], [1, 0, 2], [4]]
    assert method.form_sets(ranked, "partition", 2, random.Random(0)) == [[7, 3], [5, 1], [0, 2], [4]]
    assert method.form_sets([], "top", 3, random.Random(0)) == []
    assert method.form_sets([4], "random", 3, random.Random(0)) == [[4]]


def test_random_sets_are_seeded_subsets_in_rank_order():
    ranked = [7, 3, 5, 1, 0, 2, 4]
    draws = {tuple(method.form_sets(ranked, "random", 3, method.row_rng(0, "p1", i))[0]) for i in range(30)}
    assert len(draws) > 1  # really random across responses
    for draw in draws:
        assert len(draw) == 3 and set(draw) <= set(ranked)
        assert list(draw) == sorted(draw, key=ranked.index)
    again = method.form_sets(ranked, "random", 3, method.row_rng(0, "p1", 4))
    assert again == method.form_sets(ranked, "random", 3, method.row_rng(0, "p1", 4))


def test_paper_templates_verbatim():
    assert templates.FEEDBACK == (
        "Evaluate the response to the previous prompt in terms of how helpful it is overall. Start the evaluation "
        "with the statement - The response is {not / slightly / partially / mostly / perfectly} helpful. Then "
        "provide a brief explanation of the evaluation in 2 to 10 sentences."
    )
    assert templates.EDIT == "Edit the response to the previous prompt based on the following feedback:"
    assert templates.EDIT_WITHOUT_FEEDBACK == "Edit the response to the previous prompt to improve it."


def test_edit_instruction_pads_with_none_filler():
    text = method.edit_instruction(["fb one", "fb two"], templates.EDIT, "\n", "<None>")
    assert text == "Edit the response to the previous prompt based on the following feedback:\nfb one\nfb two\n<None>"
    assert method.edit_instruction(["a", "b", "c"], "H", " ", "<None>") == "H a b c"


def test_with_response_puts_response_as_assistant_then_instruction_as_user():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    conv = method.with_response(messages, "answer", "judge it")
    assert conv == messages + [{"role": "assistant", "content": "answer"}, {"role": "user", "content": "judge it"}]
    assert len(messages) == 2  # not mutated


@pytest.mark.parametrize(
    "text, n, choice",
    [("2", 3, 1), ("Candidate 3 is best.", 3, 2), ("[1]", 2, 0), ("I pick 7, no, 2", 4, 1), ("none", 3, None), ("0", 3, None), ("", 2, None)],
)
def test_parse_choice(text, n, choice):
    assert method.parse_choice(text, n) == choice


def test_select_instruction_numbers_candidates():
    [msg] = method.select_instruction([{"role": "user", "content": "Q?"}], ["A", "B"], templates.SELECT)
    assert msg["role"] == "user"
    assert "[1]\nA" in msg["content"] and "[2]\nB" in msg["content"] and "2 candidate responses" in msg["content"]


def test_sample_levels_greedy_and_tempered():
    logprobs = [-0.1, -3.0, -3.0, -3.0, -5.0]
    assert method.sample_levels(logprobs, 0.0, 4, random.Random(0)) == ["not"] * 4
    draws = method.sample_levels(logprobs, 1.0, 2000, random.Random(0))
    share = draws.count("not") / len(draws)
    expected = 1 / (1 + 3 * pow(2.718281828, -2.9) + pow(2.718281828, -4.9))
    assert abs(share - expected) < 0.03
    hot = method.sample_levels(logprobs, 100.0, 2000, random.Random(0))
    assert min(hot.count(level) for level in method.LEVELS) > 300  # high temperature flattens
