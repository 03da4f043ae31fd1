"""The Hugging Face backend on a tiny real model: fan-out, limits, prefixes, exact scores, batching."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from actors.backend import BackendSpec, ChatRequest, ClassifyRequest, NextTokenRequest, Sampling
from actors.hf_backend import HFBackend
from actors.errors import RequestError

Q = ({"role": "user", "content": "What is 2 + 2?"},)
LONG_Q = ({"role": "user", "content": "Tell me a long story about a dragon who learns to read."},)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def backend(tiny_model):
    return HFBackend(BackendSpec(backend="hf", model=tiny_model, batch_size=4))


def test_chat_fans_out_and_counts_tokens(backend):
    [res] = run(backend.chat([ChatRequest(Q, Sampling(n=3, temperature=0.7, top_p=0.9, max_tokens=6))]))
    assert len(res.completions) == 3
    assert res.prompt_tokens == len(backend.fmt.prompt_ids(Q))
    for c in res.completions:
        assert 1 <= c.tokens <= 6 and c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or c.tokens == 6


def test_greedy_is_deterministic_and_batch_independent(backend):
    greedy = Sampling(n=1, temperature=0.0, max_tokens=5)
    [alone] = run(backend.chat([ChatRequest(Q, greedy)]))
    together = run(backend.chat([ChatRequest(LONG_Q, greedy), ChatRequest(Q, greedy)]))
    assert together[1].completions[0].text == alone.completions[0].text  # left padding does not change results


def test_prefix_continues_the_assistant_turn(backend):
    plain = backend.fmt.prompt_ids(Q)
    prefixed = backend.fmt.prompt_ids(Q, prefix="The response is")
    assert prefixed[: len(plain)] == plain and len(prefixed) > len(plain)
    [res] = run(backend.chat([ChatRequest(Q, Sampling(max_tokens=3), prefix="The response is")]))
    assert res.prompt_tokens == len(prefixed)


def test_next_token_logprobs_match_an_unpadded_forward(backend, tiny_model):
    choices = (" not", " mostly", " perfectly")
    requests = [NextTokenRequest(LONG_Q, choices, prefix="The response is"), NextTokenRequest(Q, ("Yes", "No"))]
    results = run(backend.next_token_logprobs(requests))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for req, res in zip(requests, results):
        text = backend.fmt.prompt_text(req.messages, req.prefix)
        ids = backend.fmt.encode(text)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        expected = [float(logprobs[t]) for t in backend.fmt.choice_token_ids(text, ids, req.choices)]
        assert res.scores == pytest.approx(expected, abs=1e-4)
        assert res.prompt_tokens == len(ids)


def test_classifier_scores_match_an_unpadded_forward(tiny_classifier):
    backend = HFBackend(BackendSpec(backend="hf", model=tiny_classifier, kind="classifier"))
    convs = [Q + ({"role": "assistant", "content": "4"},), LONG_Q + ({"role": "assistant", "content": "Once upon a time."},)]
    results = run(backend.classify([ClassifyRequest(c) for c in convs]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    for conv, res in zip(convs, results):
        ids = tok(tok.apply_chat_template(list(conv), tokenize=False), add_special_tokens=False).input_ids
        with torch.no_grad():
            expected = float(model(torch.tensor([ids])).logits[0, 0])
        assert res.scores[0] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(NotImplementedError, match="sequence-classification"):
        run(HFBackend(BackendSpec(backend="hf", model=tiny_classifier)).classify([ClassifyRequest(convs[0])]))


def test_prompt_over_context_is_a_request_error_and_max_tokens_is_clamped(backend):
    huge = ({"role": "user", "content": "word " * 600},)  # the tiny model's context is 512
    with pytest.raises(RequestError, match="model's context is 512"):
        run(backend.chat([ChatRequest(huge, Sampling(max_tokens=4))]))
    near = ({"role": "user", "content": "word " * 480},)
    [res] = run(backend.chat([ChatRequest(near, Sampling(max_tokens=100))]))
    assert res.prompt_tokens + res.completions[0].tokens <= 512


def test_concurrent_calls_share_one_batch(backend, monkeypatch):
    calls = []
    original = backend._generate

    def counting(batch, *sampling):
        calls.append(len(batch))
        return original(batch, *sampling)

    monkeypatch.setattr(backend, "_generate", counting)

    async def many():
        return await asyncio.gather(*(backend.chat([ChatRequest(Q, Sampling(n=1, temperature=0.7, top_p=0.9, max_tokens=3))]) for _ in range(4)))

    results = run(many())
    assert len(results) == 4 and all(len(r[0].completions) == 1 for r in results)
    assert calls == [4]  # four callers, one generate of four rows (batch_size 4)


def poisoned(backend, monkeypatch, fails):
    """Makes the batched chat raise whenever `fails(batch)`, as a tokenizer or `generate` error does
    for a whole batch; returns the sizes of the batches run."""
    sizes = []
    original = backend._run_chat

    def run_chat(requests):
        sizes.append(len(requests))
        if fails(requests):
            raise RuntimeError("generate failed for this batch")
        return original(requests)

    monkeypatch.setattr(backend, "_run_chat", run_chat)
    return sizes


POISON = ({"role": "user", "content": "POISON"},)
TINY = Sampling(n=1, max_tokens=2)


async def concurrently(backend, jobs):
    return await asyncio.gather(*(backend.chat([ChatRequest(m, TINY) for m in job]) for job in jobs), return_exceptions=True)


def test_one_failing_request_fails_only_its_caller(backend, monkeypatch):
    sizes = poisoned(backend, monkeypatch, lambda batch: any(r.messages == POISON for r in batch))
    results = run(concurrently(backend, [[Q], [POISON], [LONG_Q, Q], [Q, POISON]]))
    assert [type(r).__name__ for r in results] == ["list", "RuntimeError", "list", "RuntimeError"]
    assert len(results[2]) == 2 and all(len(res.completions) == 1 for res in results[0] + results[2])
    assert sizes == [6, 1, 1, 2, 2, 1, 1]  # the batch, then each caller alone, then the two-request job's requests alone


def test_a_batch_that_fails_only_as_a_batch_is_answered_request_by_request(backend, monkeypatch):
    """A batch that fails for its size (out of memory, say) still answers every caller."""
    sizes = poisoned(backend, monkeypatch, lambda batch: len(batch) > 1)
    results = run(concurrently(backend, [[Q], [LONG_Q, Q]]))
    assert [len(r) for r in results] == [1, 2]
    assert sizes == [3, 1, 2, 1, 1]


def test_a_healthy_batch_runs_once(backend, monkeypatch):
    sizes = poisoned(backend, monkeypatch, lambda batch: False)
    run(concurrently(backend, [[Q], [LONG_Q], [Q, Q]]))
    assert sizes == [4]


def test_a_caller_cancelled_while_queued_is_dropped_before_any_work(backend, monkeypatch):
    """Two callers queue behind a running batch; one is cancelled (its client left): only the other runs."""
    ran = []
    original = backend._run_chat

    def run_chat(requests):
        ran.append([r.messages[0]["content"] for r in requests])
        return original(requests)

    monkeypatch.setattr(backend, "_run_chat", run_chat)

    async def scenario():
        first = asyncio.ensure_future(backend.chat([ChatRequest(Q, TINY)]))
        await asyncio.sleep(0.1)  # `first`'s batch is running (or about to): the next two queue
        gone = asyncio.ensure_future(backend.chat([ChatRequest(POISON, TINY)]))
        kept = asyncio.ensure_future(backend.chat([ChatRequest(LONG_Q, TINY)]))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, await kept, gone.cancelled()

    first, kept, cancelled = run(scenario())
    assert cancelled and len(first[0].completions) == 1 and len(kept[0].completions) == 1
    assert "POISON" not in str(ran)  # never tokenized, never generated


def test_generate_stops_at_once_for_rows_whose_caller_is_gone(backend):
    """`_Gone` ends a cancelled caller's rows at the first decode step; a live caller's row runs on."""

    async def futures():
        loop = asyncio.get_running_loop()
        gone, live = loop.create_future(), loop.create_future()
        gone.cancel()
        return gone, live

    gone, live = run(futures())
    ids = backend.fmt.prompt_ids(LONG_Q)
    backend._owners = [gone, live]
    stopped, running = backend._generate([(0, 0, ids, 40), (1, 0, ids, 40)], 0.0, 1.0)
    backend._owners = [gone]
    [alone] = backend._generate([(0, 0, ids, 40)], 0.0, 1.0)
    backend._owners = [live]
    [full] = backend._generate([(0, 0, ids, 40)], 0.0, 1.0)

    def generated(c):
        return len(backend.tokenizer.encode(c.text, add_special_tokens=False))

    assert generated(stopped) <= 1 and generated(alone) <= 1  # the first decode step's token at most
    assert full.text == running.text and len(full.text) > 10 * max(len(alone.text), len(stopped.text))


def test_a_stop_string_ends_the_completion_before_it(backend):
    """The tiny model's greedy answer is newlines: a stop string of two ends it at once; a seeded sample
    (varied text, reproducible) cut in its middle keeps exactly the text before the stop string."""
    [greedy] = run(backend.chat([ChatRequest(Q, Sampling(max_tokens=12, stop=("\n\n",)))]))
    assert greedy.completions[0].text == "" and greedy.completions[0].finish_reason == "stop" and greedy.completions[0].tokens < 12

    seeded = Sampling(n=2, temperature=1.0, max_tokens=20, seed=7)
    [full] = run(backend.chat([ChatRequest(Q, seeded)]))
    text = full.completions[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    [cut] = run(backend.chat([ChatRequest(Q, Sampling(n=2, temperature=1.0, max_tokens=20, seed=7, stop=(stop, "never seen")))]))
    first = cut.completions[0]
    assert first.text == text[: text.index(stop)] and first.finish_reason == "stop" and first.tokens < full.completions[0].tokens
    assert stop not in cut.completions[1].text


def test_a_seed_fixes_the_samples_whatever_else_is_batched(backend):
    seeded = ChatRequest(Q, Sampling(n=2, temperature=1.0, max_tokens=10, seed=11))
    [alone] = run(backend.chat([seeded]))
    together = run(backend.chat([ChatRequest(LONG_Q, Sampling(n=3, temperature=1.0, max_tokens=10)), seeded]))
    [other_seed] = run(backend.chat([ChatRequest(Q, Sampling(n=2, temperature=1.0, max_tokens=10, seed=12))]))
    assert together[1].completions == alone.completions
    assert alone.completions[0].text != alone.completions[1].text  # the n samples still differ
    assert other_seed.completions != alone.completions


def test_chat_stream_yields_the_text_as_generated_then_the_result(backend):
    """A seeded sample (varied words, reproducible): the deltas are several and add up to the text of
    the same request asked without streaming; the last item is the result."""
    request = ChatRequest(Q, Sampling(n=1, temperature=1.0, max_tokens=30, seed=5))
    [plain] = run(backend.chat([request]))

    async def collect():
        return [item async for item in backend.chat_stream(request)]

    items = run(collect())
    *deltas, result = items
    assert len(deltas) > 1 and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == result.completions[0].text == plain.completions[0].text
