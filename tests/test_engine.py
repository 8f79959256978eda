"""The generation engine: a key/value cache that changes nothing, batches that change nothing, and every control."""
import copy
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from fournil.config import LoraConfig
from fournil.generate import Busy, SamplingParams, Scheduler, complete, score, stream
from fournil.generate import engine
from fournil.generate.engine import batch_rows
from fournil.generate.scheduler import decoding_weights
from fournil.generate.text import TextStream
from fournil.models import build_model
from fournil.models.lora import LoRALinear, add_lora, lora_disabled, merge_lora
from fournil.runs import Run
from fournil.tokenizers import CharTokenizer

SIZES = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 40, "vocab_size": 50}


@pytest.mark.parametrize("family,extra", [("gpt", {}), ("llama", {"n_kv_head": 2}),
                                          ("llama", {"n_kv_head": 1, "sliding_window": 5})])
def test_cache_and_padding_give_the_logits_of_a_full_pass(family, extra):
    torch.manual_seed(0)
    model = build_model({"family": family, **SIZES, **extra}).eval()
    x, other = torch.randint(50, (1, 20)), torch.randint(50, (1, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, 40, torch.float32)
        pieces = [model(x[:, :12], cache), model(x[:, 12:15], cache)] + [model(x[:, t : t + 1], cache) for t in range(15, 20)]
        assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)  # prefill, a chunk, then one token at a time
        # two prompts of different lengths in one batch: the shorter one padded on the left
        batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), x[:, :15]], 1), other], 0)
        valid = torch.ones(2, 20, dtype=torch.bool)
        valid[0, :5] = False
        cache = model.new_cache(2, 40, torch.float32)
        out = model(batch, cache, valid)
        assert torch.allclose(out[0, 5:], model(x[:, :15])[0], atol=1e-5)
        assert torch.allclose(out[1], model(other)[0], atol=1e-5)
        nxt = torch.tensor([[7], [9]])
        assert torch.allclose(model(nxt, cache)[0, 0], model(torch.cat([x[:, :15], nxt[:1]], 1))[0, -1], atol=1e-5)


def test_batched_generation_equals_one_by_one(trained):
    run = Run.load(trained["llama"], "cpu")
    prompts = [run.tokenizer.prompt_ids(p) for p in ("ma", "christ", "j")]
    params = SamplingParams(max_new_tokens=8, temperature=0)  # within the context: no refill
    assert max(map(len, prompts)) + 8 <= run.model.config.block_size
    together = complete(run.model, run.tokenizer, prompts, params)
    alone = [complete(run.model, run.tokenizer, [p], params)[0] for p in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    for c in together:
        assert c.logprobs == pytest.approx(alone[together.index(c)].logprobs, abs=1e-5)


def test_answers_are_generated_as_many_at_a_time_as_their_cache_fits_in_the_memory_budget(monkeypatch):
    # the default batch of ``complete``: all prompts, unless their key/value cache outgrows 1 GiB on a CPU (a
    # teacher's answers for sequence-level distillation are thousands: all at once would not fit in memory)
    model = build_model({"family": "llama", **SIZES, "n_kv_head": 2}).eval()
    row = model.new_cache(1, 33, torch.float32)  # one answer's cache: a prompt of 3 tokens and 30 new ones
    row_bytes = sum(t.numel() * t.element_size() for t in row.k + row.v)
    prompts = [[1, 2, 3]] * 300_000
    params = [SamplingParams(max_new_tokens=30)] * len(prompts)
    assert batch_rows(model, prompts, params, torch.float32) == 2**30 // row_bytes == 127_100
    assert batch_rows(model, prompts, params, torch.bfloat16) == 2**30 // (row_bytes // 2)  # a cache in bf16
    assert batch_rows(model, prompts[:1000], params[:1000], torch.float32) == 1000
    # a row holds at most the model's context, whatever the answer's length asked for
    longer = [SamplingParams(max_new_tokens=1_000)] * len(prompts)
    assert batch_rows(model, prompts, longer, torch.float32) == 2**30 // (row_bytes // 33 * SIZES["block_size"])
    # complete() answers in waves of what fits: a budget of two rows, six answers of 30 tokens
    monkeypatch.setattr(engine, "memory_budget", lambda device: 2 * row_bytes)
    finished = []
    tok = CharTokenizer([chr(ord("a") + i) for i in range(SIZES["vocab_size"])])
    done = complete(model, tok, prompts[:6], SamplingParams(max_new_tokens=30, ignore_eos=True), progress=finished.append)
    assert [len(c.tokens) for c in done] == [30] * 6
    assert finished == [0] * 29 + [2] * 30 + [4] * 30  # two by two: three waves of 30 steps (not 30 steps in all)
    # a transformer of no layers (a bigram with positions) keeps no cache: its answers all at once
    for family in ("gpt", "llama"):
        flat = build_model({"family": family, **SIZES, "n_layer": 0}).eval()
        assert batch_rows(flat, prompts[:1000], params[:1000], torch.float32) == 1000
        assert len(complete(flat, tok, prompts[:3], SamplingParams(max_new_tokens=5, ignore_eos=True))[2].tokens) == 5


def test_a_generation_makes_each_weight_once_with_autocast_s_products_and_gives_the_model_back_as_it_was(trained):
    """While a scheduler has sequences (``complete``, ``stream``, a server's), fp32 weights are cast to the autocast
    precision once, not at every step, and a LoRA adapter is folded into its layers: the same products as autocast's
    casts at every pass (bit for bit in bf16) and the same answers as the merged model's (fp32); afterwards, and
    when a stream is dropped halfway, the model's own parameters, tied, trainable as they were."""
    run = Run.load(trained["llama"], "cpu")
    model, tok = run.model, run.tokenizer
    prompt, params = tok.prompt_ids("ma"), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    linear = lambda: {m.weight.dtype for m in model.modules() if isinstance(m, torch.nn.Linear)}  # noqa: E731
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        each_pass = model(torch.tensor([prompt]))  # autocast casts every weight for this pass
        with decoding_weights(model, torch.bfloat16):
            assert torch.equal(model(torch.tensor([prompt])), each_pass)
    during = []
    once = complete(model, tok, [prompt], params, torch.bfloat16, progress=lambda _: during.append(linear()))[0]
    assert during and all(kinds == {torch.bfloat16} for kinds in during)  # the output layer too
    embeddings = model.model.embed_tokens.weight
    assert embeddings.dtype == torch.float32 and model.lm_head.weight is embeddings  # untouched, still tied
    streamed = [(p.token, p.logprob, linear()) for p in stream(model, tok, prompt, params, torch.bfloat16)]
    assert [(t, lp) for t, lp, _ in streamed] == list(zip(once.tokens, once.logprobs))
    # the pieces come between steps, the weights held; the last after the step that ended the answer gave them back
    assert [kinds for *_, kinds in streamed] == [{torch.bfloat16}] * 7 + [{torch.float32}]
    conversation = Scheduler(model, tok, torch.bfloat16, max_batch=1, max_waiting=1, keep=True)  # (fournil chat's)
    dropped = stream(model, tok, prompt, params, torch.bfloat16, scheduler=conversation)
    next(dropped)
    assert linear() == {torch.bfloat16}
    dropped.close()  # a reader that stops early (a client gone), its scheduler kept for the next turn
    assert linear() == {torch.float32} and model.lm_head.weight is embeddings
    server = Scheduler(model, tok, torch.bfloat16)  # other work between steps (scoring a prompt) gets the model's own
    server.submit(prompt, params)
    server.step()
    scored = server.call(linear)
    server.safe_step()
    assert scored.result() == {torch.float32} and linear() == {torch.bfloat16}
    while server.step():
        pass
    assert linear() == {torch.float32}

    plain = complete(model, tok, [prompt], params)[0]
    add_lora(model, LoraConfig(rank=4, alpha=8))
    model.eval()  # (the adapter's new dropout layers too)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    before = [(name, p, p.dtype, p.requires_grad) for name, p in model.named_parameters()]
    x = torch.tensor([prompt])
    with torch.no_grad():
        adapted = model(x)
    during.clear()
    seen = lambda _: during.append(all(m.disabled for m in model.modules() if isinstance(m, LoRALinear)))
    folded = complete(model, tok, [prompt], params, progress=seen)[0]
    assert during and all(during)  # one product per layer, the adapter in it
    assert [(name, p, p.dtype, p.requires_grad) for name, p in model.named_parameters()] == before
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        assert torch.equal(model(x), adapted)
    with lora_disabled(model):  # the base model's answer, not the adapter's
        base = complete(model, tok, [prompt], params)[0]
    merged = complete(merge_lora(copy.deepcopy(model)), tok, [prompt], params)[0]
    assert folded.tokens == merged.tokens and folded.logprobs == pytest.approx(merged.logprobs, abs=1e-5)
    assert (base.tokens, base.logprobs) == (plain.tokens, plain.logprobs) and folded.logprobs != plain.logprobs


def test_seeded_sampling_is_reproducible_and_logprobs_are_the_model_s(trained):
    run = Run.load(trained["gpt"], "cpu")
    prompt = run.tokenizer.prompt_ids("an")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, logprobs=3)
    a, b = (complete(run.model, run.tokenizer, [prompt] * 4, params) for _ in range(2))
    assert [c.tokens for c in a] == [c.tokens for c in b]
    other = complete(run.model, run.tokenizer, [prompt] * 4, SamplingParams(max_new_tokens=10, seed=8))
    assert [c.tokens for c in a] != [c.tokens for c in other]
    first = a[0]
    assert first.logprobs == pytest.approx(score(run.model, prompt + first.tokens, len(prompt)), abs=1e-5)
    assert all(len(top) == 3 and max(top.values()) >= lp - 1e-6 for top, lp in zip(first.top, first.logprobs))


def test_stop_strings_across_token_boundaries():
    tok = CharTokenizer(list("abns"))
    text = TextStream(tok, stop=("nan",))
    shown = [text.feed(t) for t in tok.encode("bananas")[:5]]
    assert "".join(shown) == "ba" and text.done  # "n" and "a" were held back until "nan" was certain
    assert text.text == "ba"
    free = TextStream(tok, stop=("nab",))
    shown = [free.feed(t) for t in tok.encode("banana")]
    assert "".join(shown) + free.finish() == "banana" and not free.done


class Counting:
    """A tokenizer that records how many tokens each decoding reads."""

    def __init__(self, tokenizer):
        self.tokenizer, self.stop_ids, self.read = tokenizer, tokenizer.stop_ids, []

    def decode(self, ids):
        self.read.append(len(ids))
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_streamed_text_is_the_whole_answer_decoded_and_costs_the_same_at_any_length(kind, tmp_path):
    """Each token's text comes from decoding its last few tokens only, and what is shown is, at every token that ends
    on a whole character, the whole answer decoded at once: characters split across tokens (é, €, 🍞 in bytes) wait
    for their last byte, and the space a SentencePiece decoder drops at the start of a text is kept inside one."""
    from fournil.config import RunConfig
    from fournil.formats import export
    from fournil.tokenizers.bpe import train_bpe
    from tests.test_formats import sentencepiece_style_tokenizer

    line = "Le boulanger cuit du pain 🍞 à 5 €, déjà prêt ; the baker bakes bread. "
    if kind == "byte-level":
        tok = train_bpe([line], 300)
    else:  # as fournil reads a Llama-2 style GGUF: pieces, and bytes for what they miss
        spm = sentencepiece_style_tokenizer()
        model = build_model({"family": "llama", "vocab_size": spm.vocab_size, "block_size": 32, "n_layer": 1})
        export(Run(tmp_path, RunConfig(model={}), model, spm, {}, "float32"), tmp_path / "spm.gguf", "gguf")
        tok = Run.load(tmp_path / "spm.gguf", "cpu").tokenizer
    text = line * 40
    ids = tok.encode(text)
    counting = Counting(tok)
    stream, shown, split = TextStream(counting, stop=()), "", 0
    for n, token in enumerate(ids, 1):
        shown += stream.feed(token)
        whole = tok.decode(ids[:n])
        if whole.endswith("\ufffd"):
            split += 1
        else:
            assert shown == whole, n
    assert len(ids) > 1000 and split > 40  # long, and characters were split
    assert shown + stream.finish() == text
    assert max(counting.read) <= 8  # never the whole answer: the same work at token 10 and at token 1000

    # an answer that ends inside a character (a small model's bytes, cut by max_tokens or by a stop token) shows it
    # as it decodes (U+FFFD), to its end
    split = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    for stop_token in (None, 10**6):
        stream = TextStream(tok, stop=(), stop_ids=(stop_token,))
        shown = "".join(stream.feed(t) for t in ids[:split])
        shown += stream.finish() if stop_token is None else stream.feed(stop_token)
        assert shown == tok.decode(ids[:split]) and shown.endswith("\ufffd")


def test_stream_and_long_text_beyond_the_context(running_text):
    run = Run.load(running_text, "cpu")
    params = SamplingParams(max_new_tokens=60, temperature=0.8, seed=3)
    pieces = list(stream(run.model, run.tokenizer, run.tokenizer.prompt_ids("KING"), params))
    assert len(pieces) == 60  # 4 + 60 tokens in a context of 16: the cache was refilled from the last half
    whole = complete(run.model, run.tokenizer, [run.tokenizer.prompt_ids("KING")], params)[0]
    assert [p.token for p in pieces] == whole.tokens and "".join(p.text for p in pieces) == whole.text


@pytest.mark.parametrize("block", [1, 2, 3])
def test_a_context_of_one_two_or_three_tokens_generates_past_it(block):
    """A context of 1 token, which cannot be halved, goes on from its last token: each next token is the one a pass
    over the token before it alone gives (greedy). Contexts of 2 and 3 go on from their last half."""
    torch.manual_seed(0)
    model = build_model({"family": "gpt", **SIZES, "block_size": block}).eval()
    tok = CharTokenizer([chr(ord("a") + i) for i in range(SIZES["vocab_size"])])
    tokens = complete(model, tok, [[3]], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0].tokens
    assert len(tokens) == 12
    if block == 1:
        with torch.no_grad():
            assert tokens == [int(model(torch.tensor([[t]]))[0, -1].argmax()) for t in [3] + tokens[:-1]]


def assert_greedy(model, tokenizer, prompt: list[int], tokens: list[int], finish: str, n: int, rel: float,
                  ignore_eos: bool = False) -> None:
    """``tokens``, then ``finish``, are greedy decoding's of at most ``n`` tokens, against the reference: the whole
    context read again for every token, no cache, no batch. Each token chosen is the most likely there, or within
    ``rel`` of the largest score from it: the tiny test models have near ties, which another order of the same sums
    (a batch, a cache, compiled code) may break the other way at the precision's rounding."""
    stops = set() if ignore_eos else tokenizer.stop_ids
    ends = tokens + ([] if finish == "length" else [None])  # None: a stop token came next
    assert len(tokens) <= n and (len(tokens) == n) == (finish == "length"), finish
    with torch.no_grad():
        for k, token in enumerate(ends):
            logits = model(torch.tensor([prompt + tokens[:k]]))[0, -1].float()
            chosen = max(logits[t] for t in stops) if token is None else logits[token]
            assert token not in stops and chosen >= logits.max() - rel * logits.abs().max(), (k, tokens)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_sequences_join_and_leave_the_batch_between_steps(trained, family):
    run = Run.load(trained[family], "cpu")
    tok, block = run.tokenizer, run.model.config.block_size
    words = ["ma", "christ", "j", "ann", "el", "xavier"]
    budgets = [9, 3, 7, 5, 2, 6]  # sequences leave at different steps, and waiting ones take their rows
    prompts = [tok.prompt_ids(w) for w in words]
    assert max(len(p) + n for p, n in zip(prompts, budgets)) <= block
    scheduler = Scheduler(run.model, tok, max_batch=3, first_columns=4)  # a narrow cache: it must grow and realign
    # each takes its whole budget: when it leaves is the test's, not a fixture's that learnt to end names early
    requests = [scheduler.submit(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                for p, n in zip(prompts, budgets)]
    batch_sizes = []
    while scheduler.step():
        batch_sizes.append(len(scheduler.active))
    assert max(batch_sizes) == 3 and len(batch_sizes) < sum(budgets)  # rows were shared, never more than three
    for r, p, n in zip(requests, prompts, budgets):
        assert_greedy(run.model, tok, p, [piece.token for piece in r if piece.token >= 0], r.finish_reason, n, 1e-5,
                      ignore_eos=True)


def test_scheduler_thread_serves_concurrent_requests_and_cancellation(running_text):
    run = Run.load(running_text, "cpu")
    tok = run.tokenizer
    scheduler = Scheduler(run.model, tok, max_batch=2, max_waiting=2).start()
    try:
        slow = scheduler.submit(tok.prompt_ids("KING"), SamplingParams(max_new_tokens=10**9, seed=1))  # endless
        first = next(iter(slow))
        assert first.text or first.token >= 0
        slow.cancel()  # a reader that goes away frees its row: the others still finish
        results = {}

        def ask(i):
            r = scheduler.submit(tok.prompt_ids("To be"), SamplingParams(max_new_tokens=30, temperature=0))
            results[i] = [p.token for p in r if p.token >= 0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        alone = complete(run.model, tok, [tok.prompt_ids("To be")], SamplingParams(30, temperature=0))[0]
        assert results[0] == results[1] == alone.tokens
        assert slow.finish_reason is None and slow.done
    finally:
        scheduler.close()


def test_a_full_queue_says_busy(trained):
    run = Run.load(trained["gpt"], "cpu")
    scheduler = Scheduler(run.model, run.tokenizer, max_batch=1, max_waiting=1)
    scheduler.submit(run.tokenizer.prompt_ids("a"), SamplingParams(max_new_tokens=2))
    with pytest.raises(Busy, match="already waiting"):
        scheduler.submit(run.tokenizer.prompt_ids("b"), SamplingParams(max_new_tokens=2))


def test_a_cancelled_sequence_hands_its_row_to_a_waiting_one(running_text):
    run = Run.load(running_text, "cpu")
    tok, params = run.tokenizer, SamplingParams(max_new_tokens=8, temperature=0)
    scheduler = Scheduler(run.model, tok, max_batch=2)
    a, b = (scheduler.submit(tok.prompt_ids(p), params) for p in ("KING", "To be"))
    scheduler.step()
    scheduler.step()
    c = scheduler.submit(tok.prompt_ids("ROMEO"), params)
    a.cancel()  # leaves at the next step, which admits c into a's row
    while scheduler.step():
        pass
    assert len(list(a)) == 2 and a.finish_reason is None  # two tokens, then its iterator ended
    for r, p in ((b, "To be"), (c, "ROMEO")):
        assert_greedy(run.model, tok, tok.prompt_ids(p), [x.token for x in r if x.token >= 0], r.finish_reason, 8, 1e-5)


def test_a_joining_prompt_copies_the_prefix_it_shares_with_a_running_row_and_answers_as_if_it_read_it(bpe_llama):
    """A system prompt, or the earlier turns of a conversation, is read once: a request that joins the batch takes the
    longest prefix it shares with a row in the cache, reads only the rest (in the pass that reads the others'), and
    gets the answer of a whole reading."""
    run = Run.load(bpe_llama, "cpu")
    tok = run.tokenizer
    system = {"role": "system", "content": "You are the king of Navarre, and you answer in verse."}
    first = tok.chat_ids([system, {"role": "user", "content": "Who art thou?"}])
    scheduler = Scheduler(run.model, tok, max_batch=4, first_columns=8)  # narrow: joining must widen and realign it
    a = scheduler.submit(first, SamplingParams(30, temperature=0, ignore_eos=True))
    for _ in range(4):
        scheduler.step()
    assert a.generated == 4 and a.shared == 0
    prompts = {"same system prompt": tok.chat_ids([system, {"role": "user", "content": "What of the queen?"}]),
               "a's conversation so far, and more": a.context[:len(first) + 3] + tok.encode(" And thou?"),
               "the very same prompt": first,
               "nothing in common, longer": tok.encode("ROMEO: But soft, what light through yonder window? " * 2)}
    joining = {name: scheduler.submit(p, SamplingParams(12, temperature=0, ignore_eos=True, logprobs=1))
               for name, p in prompts.items()}
    while scheduler.step():
        pass
    system_prefix = len(os.path.commonprefix([first, prompts["same system prompt"]]))
    assert system_prefix > len(tok.encode(system["content"]))
    assert {name: r.shared for name, r in joining.items()} == {
        "same system prompt": system_prefix, "a's conversation so far, and more": len(first) + 3,
        "the very same prompt": len(first) - 1, "nothing in common, longer": 0}
    for name, r in joining.items():
        pieces = [p for p in r if p.token >= 0]
        whole = complete(run.model, tok, [prompts[name]], SamplingParams(12, temperature=0, ignore_eos=True))[0]
        assert [p.token for p in pieces] == whole.tokens, name
        assert [p.logprob for p in pieces] == pytest.approx(whole.logprobs, abs=1e-4), name


def test_prompts_that_arrive_together_read_the_prefix_they_share_once(bpe_llama):
    """Few-shot benchmark prompts, a system prompt, ``n`` answers to one prompt: the first is read, then the others in
    a second pass that takes their shared prefix from its row; each answer is the one it gets alone."""
    run = Run.load(bpe_llama, "cpu")
    tok = run.tokenizer
    system = {"role": "system", "content": "You are the king of Navarre, and you answer in verse."}
    asked = [tok.chat_ids([system, {"role": "user", "content": q}]) for q in ("Who art thou?", "What of the queen?")]
    prompts = [asked[0], tok.encode("ROMEO: But soft!"), asked[1], asked[0], tok.encode("ROMEO: But soft, what")]
    scheduler = Scheduler(run.model, tok, max_batch=5)
    params = SamplingParams(10, temperature=0, ignore_eos=True)
    requests = [scheduler.submit(p, params) for p in prompts]
    while scheduler.step():
        pass
    system_prefix = len(os.path.commonprefix(asked))
    assert system_prefix > len(tok.encode(system["content"]))
    romeo = len(os.path.commonprefix(prompts[1::3]))
    assert romeo < 16  # too short to be worth a pass of its own: read with the first ones
    assert [r.shared for r in requests] == [0, 0, system_prefix, len(asked[0]) - 1, 0]
    for r, p in zip(requests, prompts):
        assert [x.token for x in r if x.token >= 0] == complete(run.model, tok, [p], params)[0].tokens


def test_a_kept_conversation_reads_only_each_turns_new_tokens_and_answers_as_if_it_read_it_whole(bpe_llama):
    """``fournil chat``: a scheduler that keeps its last answer (``keep``) empties its cache when idle, as any does, but
    the next turn copies the keys and values of everything it shares with that answer's sequence, reads the rest, and
    answers as a whole reading does; a prompt that does not go on from it is read whole."""
    run = Run.load(bpe_llama, "cpu")
    tok = run.tokenizer
    turns = Scheduler(run.model, tok, max_batch=1, max_waiting=1, keep=True, first_columns=8)
    params = SamplingParams(10, temperature=0, ignore_eos=True, logprobs=1)
    prompts = [tok.chat_ids([{"role": "user", "content": "Who art thou?"}])]
    shared = []
    for more in (" And the queen?", " Speak!", "ROMEO: But soft"):
        r = turns.submit(prompts[-1], params)
        while turns.step():
            pass
        assert turns.cache is None  # idle: the cache is gone, the kept answer is not
        shared.append(r.shared)
        pieces = [p for p in r if p.token >= 0]
        whole = complete(run.model, tok, [prompts[-1]], params)[0]
        assert [p.token for p in pieces] == whole.tokens
        assert [p.logprob for p in pieces] == pytest.approx(whole.logprobs, abs=1e-4)
        # the next turn: the conversation so far (prompt and answer), then more
        prompts.append(r.context + tok.encode(more) if more[0] == " " else tok.encode(more))
    # each turn copies its whole conversation but the answer's last token, which was never fed to the model
    assert shared == [0, len(prompts[0]) + 9, len(prompts[1]) + 9]
    r = turns.submit(prompts[-1], params)
    while turns.step():
        pass
    assert r.shared == 0
    assert [p.token for p in r if p.token >= 0] == complete(run.model, tok, prompts[-1:], params)[0].tokens


def test_chat_keeps_its_conversation_and_an_answer_read_in_part_frees_the_model_for_the_next(bpe_llama):
    """What ``fournil chat`` uses: a :class:`Local` with ``conversation`` answers each turn as a model that reads the
    whole conversation does, keeps the conversation's last sequence, and goes on after a reader stops mid-answer."""
    from fournil.generate.answerers import Local

    run = Run.load(bpe_llama, "cpu")
    chat, fresh = Local(run, conversation=True), Local(run)
    params = SamplingParams(8, temperature=0, ignore_eos=True)
    messages = [{"role": "user", "content": "Who art thou?"}]
    partial = chat.chat(messages, params)
    answer = next(partial) + next(partial)
    partial.close()  # the reader leaves after two pieces (Ctrl-C in a terminal)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the queen?"}]
    second = "".join(chat.chat(messages, params))
    assert second == "".join(fresh.chat(messages, params))
    asked = run.tokenizer.chat_ids(messages)
    assert chat.turns.kept[0][:len(asked)] == asked and len(chat.turns.kept[0]) == len(asked) + 7


def test_a_chat_answer_says_whether_its_length_or_the_context_cut_it(bpe_llama):
    """What `fournil chat` tells beside an answer cut short (it ended mid-sentence without a word)."""
    from fournil.generate.answerers import Local

    run = Run.load(bpe_llama, "cpu")
    chat, params = Local(run), SamplingParams(8, temperature=0, ignore_eos=True)
    "".join(chat.chat([{"role": "user", "content": "Who art thou?"}], params))
    assert chat.cut == "length"
    words = next(n for n in range(300, 400) if len(run.tokenizer.chat_ids(
        [{"role": "user", "content": "the cat " * n}])) > run.model.config.block_size - 8)
    "".join(chat.chat([{"role": "user", "content": "the cat " * words}], params))
    assert chat.cut == "context"
    partial = chat.chat([{"role": "user", "content": "Who art thou?"}], params)
    next(partial)
    partial.close()  # stopped by its reader: not cut
    assert chat.cut is None


def test_the_python_api_chats_with_a_message_or_a_conversation_and_says_what_it_cannot(bpe_llama, trained):
    from fournil.errors import FournilError

    run = Run.load(bpe_llama, "cpu")
    greedy = {"temperature": 0, "max_new_tokens": 8}
    said = run.chat("Who art thou?", **greedy)
    assert said == run.chat([{"role": "user", "content": "Who art thou?"}], **greedy)
    parts = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Who art"}, {"type": "text", "text": "thou?"}]}]  # as the server reads them
    assert run.chat(parts, **greedy) == run.chat([{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Who art\nthou?"}], **greedy)
    assert run.chat("Who art thou?", seed=5) == run.chat("Who art thou?", seed=5)
    for wrong in ([], [{"role": "bot", "content": "Hi"}], [{"role": "user"}], 7, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x.png"}}]}]):
        with pytest.raises(FournilError, match=r"give a message as text, or the conversation as a list of "):
            run.chat(wrong)
    with pytest.raises(FournilError, match=r"names-gpt: this model has no chat template .*sample\(prompt=...\)"):
        Run.load(trained["gpt"], "cpu").chat("Hi")


@pytest.mark.precision
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8", "int4"])
def test_an_answer_does_not_depend_on_what_was_generated_before_or_beside_it(bpe_llama, precision):
    """To the last bit, in every precision: a request to an idle scheduler is computed as the first one was (greedy
    and seeded alike), and with ``batch_invariant`` a request among others as if it were alone, its neighbours
    joining at other steps, one of them with a prompt that widens the cache. Without it, only close."""
    run = Run.load(bpe_llama, "cpu", "float32" if precision.startswith("int") else precision)
    if precision.startswith("int"):
        run.quantize(precision)
    tok = run.tokenizer
    prompt = tok.prompt_ids("KING HENRY:")
    asked = [SamplingParams(40, temperature=0), SamplingParams(40, temperature=0.9, seed=3)]

    def answer(request):
        pieces = [p for p in request if p.token >= 0]
        return [p.token for p in pieces], [p.logprob for p in pieces]

    def alone(params):
        c = complete(run.model, tok, [prompt], params, run.dtype)[0]
        return c.tokens, c.logprobs

    first = [alone(p) for p in asked]
    scheduler = Scheduler(run.model, tok, run.dtype, max_batch=4)
    for k in range(3):
        scheduler.submit(tok.prompt_ids("ROMEO " * (k + 1)), SamplingParams(10 + 7 * k, temperature=0.8, seed=k))
        while scheduler.step():
            pass
        for params, expected in zip(asked, first):
            request = scheduler.submit(prompt, params)
            while scheduler.step():
                pass
            assert answer(request) == expected

    def among_others(batch_invariant: bool, params):
        s = Scheduler(run.model, tok, run.dtype, max_batch=4, batch_invariant=batch_invariant)
        s.submit(tok.prompt_ids("To be or not to be"), SamplingParams(30, temperature=0))
        s.step()
        s.step()
        request = s.submit(prompt, params)
        s.step()
        s.submit(tok.prompt_ids("To be or not to be, " * 60), SamplingParams(50, temperature=0))  # > 256 columns
        s.step()
        s.submit(tok.prompt_ids("ROMEO"), SamplingParams(80, temperature=0.8, seed=1))
        while s.step():
            pass
        return answer(request)

    for params, expected in zip(asked, first):
        assert among_others(True, params) == expected
        tokens, logprobs = among_others(False, params)
        assert logprobs[:5] == pytest.approx(expected[1][:5], abs=0.05)


def test_a_failing_step_ends_its_sequences_and_the_engine_goes_on(trained, monkeypatch):
    """A fault inside the model (injected: its next forward pass fails, once) ends the sequences of that step with an
    error; the scheduler's thread lives on and serves the next request."""
    run = Run.load(trained["llama"], "cpu")
    tok, model = run.tokenizer, run.model
    forward, armed = model.forward, [True]

    def failing(*args, **kwargs):
        if armed.pop() if armed else False:
            raise RuntimeError("a fault inside the model")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    scheduler = Scheduler(model, tok, max_batch=2).start()
    try:
        doomed = scheduler.submit(tok.prompt_ids("qu"), SamplingParams(max_new_tokens=5, temperature=0))
        assert list(doomed) == [] and doomed.finish_reason == "error"
        fine = scheduler.submit(tok.prompt_ids("an"), SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
        assert len([p for p in fine if p.token >= 0]) == 3 and fine.finish_reason == "length"
    finally:
        scheduler.close()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_weights_are_for_transformers_only(cli, trained, precision):
    result = cli("generate", trained["ngram"], "an", "--dtype", precision, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{precision} weights are for Transformers (gpt, llama, seq2seq); the ngram model is small enough" in \
        result.stderr


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_model_counts_the_parameters_it_had_and_says_its_weights_precision(bpe_llama, trained, precision):
    for model in (bpe_llama, trained["gpt"]):  # (the gpt's biases were left out of the count)
        run = Run.load(model, "cpu", "float32")
        before = run.model.num_params()
        assert run.quantize(precision).model.num_params() == before, model
        assert run.precision == f"cpu bfloat16, {precision} weights"  # (what `fournil serve` says it serves)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_model_gives_its_scores_in_fp32_and_its_activations_in_bf16(bpe_llama, precision):
    """Rounded to bf16, the output layer's scores came in steps of 1/16 to 1/8 (SmolLM2's largest), which decided
    near ties and the log-probabilities (SmolLM2's perplexity: int8 +0.65 % against fp32, int4 +0.28 %; in fp32,
    +0.45 % and +0.19 %). On a CPU with AVX2 they are fournil's kernel's fp32 sums as they come; elsewhere PyTorch's
    int8 kernel computes them in bf16."""
    from fournil.device import autocast
    from fournil import kernels
    from fournil.generate.quantize import QuantizedLinear

    run = Run.load(bpe_llama, "cpu", "float32").quantize(precision)
    head = run.model.lm_head
    inner = next(m for m in run.model.modules() if isinstance(m, QuantizedLinear) and m is not head)
    with torch.no_grad(), autocast(run.model.device, run.dtype):
        hidden = run.model.hidden(torch.tensor([run.tokenizer.encode("To be, or not to be")]))
        scores = head(hidden)
        assert inner(torch.randn(3, inner.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert scores.dtype == torch.float32 and run.model(torch.zeros(1, 1, dtype=torch.long)).dtype == torch.float32
    if kernels.instructions():
        assert torch.equal(scores, kernels.linear(hidden, head.weight, head.out_features, head.scale,
                                                  head.kernel == 2))
        assert not torch.equal(scores, scores.bfloat16().float())


@pytest.mark.parametrize("instructions", [1, 2], ids=["avx2", "vnni"])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_in_fournil_s_kernel_multiplies_each_row_on_its_own_within_its_activations_rounding(
        bits, instructions, monkeypatch):
    """On a CPU with AVX2 (or AVX512-VNNI, whose instructions it then uses), int8 and int4 layers multiply in integers
    (``products.cpp``), each row's activations quantized to int8 in groups of 32: a row's result is the same bit for
    bit whatever the other rows and however many threads share the work, a row of zeros gives the bias, the weights
    the layer multiplies by (read back with one-hot rows) are the layer's within half a step of their quantization,
    and every output is within what rounding each activation to half a step (its group's largest / 127 / 2) allows of
    the exact product with those weights. A CPU with VNNI checks both sets of instructions."""
    from fournil import kernels
    from fournil.generate.quantize import GROUP, Int4Linear, Int8Linear

    if kernels.instructions() < instructions:
        pytest.skip(f"no {'AVX2' if instructions == 1 else 'AVX512-VNNI'} here, or no compiler to build fournil's "
                    "kernel: the layers use PyTorch's kernels")
    monkeypatch.setattr(kernels, "instructions", lambda: instructions)
    torch.manual_seed(0)
    linear = torch.nn.Linear(100, 40)  # padded to 128 inputs (4 groups) and 48 outputs (3 blocks of 16)
    layer = (Int8Linear if bits == 8 else Int4Linear)(linear)
    bias, original = linear.bias.detach(), linear.weight.detach().double()
    x = torch.randn(11, 100) * torch.logspace(-2, 1, 100)  # 11 rows: a pass of 8, then 3
    x[3] = 0
    together = layer(x)
    assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(11)]))
    assert torch.equal(together, layer(x.flip(0)).flip(0))
    threads = torch.get_num_threads()  # (1 in a test worker of 2 on 2 cores: set both ways here)
    try:
        by_count = {}
        for n in (1, 2):  # the 3 blocks of outputs on one thread, then shared between two
            torch.set_num_threads(n)
            by_count[n] = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(by_count[1], together) and torch.equal(by_count[2], together)
    assert torch.equal(together[3], bias)
    weights = (layer(torch.eye(100)) - bias).T.double()  # one-hot rows: their only code is 127, one step of 1/127
    if bits == 8:  # a step per row: its largest |w| / 127
        half_step = original.abs().amax(1, keepdim=True) / 127 / 2
    else:  # a step per group of 32: its range / 15
        groups = F.pad(original, (0, 28)).view(40, -1, GROUP)
        half_step = ((groups.amax(-1) - groups.amin(-1)) / 15 / 2).repeat_interleave(GROUP, 1)[:, :100]
    assert ((weights - original).abs() <= 1.2 * half_step).all()  # 1.2: scales are rounded to bf16, codes clamped
    exact = x.double() @ weights.T + bias.double()
    steps = F.pad(x, (0, 28)).view(11, -1, GROUP).abs().amax(-1) / 127 / 2  # half a step, per row and group
    bound = steps.double() @ F.pad(weights.abs(), (0, 28)).view(40, -1, GROUP).sum(-1).T
    assert ((together.double() - exact).abs() <= bound + 1e-5 * (x.abs().double() @ weights.abs().T)).all()
    with pytest.raises(RuntimeError, match="8-bit weights need their rows' scales, 4-bit ones have theirs inside"):
        torch.ops.fournil.int_linear(F.pad(x, (0, 28)), layer.weight, None if bits == 8 else layer.weight[0, 0, :16],
                                     instructions == 2)


def kernel_layout(codes: torch.Tensor, bits: int, scale=None, zero=None) -> torch.Tensor:
    """``products.cpp``'s layout of ``codes`` (out x in, unsigned, padded to blocks of 16 rows and groups of 32 inputs),
    as its comment says it: per block of 16 rows and group of 32 inputs, for every 4 inputs (4-bit: inputs 0-3 of
    every 8 in low nibbles, 4-7 in high ones), each row's 4 codes; 4-bit, then the 16 rows' bf16 scales and zeros."""
    out, inputs = codes.shape
    blocks, groups = out // 16, inputs // 32
    fours = codes.to(torch.uint8).contiguous().view(torch.int32)
    if bits == 4:
        pairs = fours.view(out, -1, 2)
        fours = pairs[..., 0] | (pairs[..., 1] << 4)
    packed = fours.view(blocks, 16, groups, -1).permute(0, 2, 3, 1).reshape(blocks, groups, -1).view(torch.uint8)
    if bits == 8:
        return packed
    rows_side_by_side = [t.to(torch.bfloat16).view(blocks, 16, groups).transpose(1, 2).contiguous().view(torch.uint8)
                         for t in (scale, zero)]
    return torch.cat([packed, *rows_side_by_side], -1)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_kernel_quantizes_weights_in_one_pass_to_the_bits_of_pytorch_s_arithmetic(bits):
    """``int_quantize`` makes a layer's codes, scales and zeros and lays them out in one pass over its weights (with
    PyTorch's operations, SmolLM2's decoder layers took 0.29 s on an AVX2 CPU, now 0.08): bit for bit those of
    ``int4_codes`` and ``int8_codes`` in ``products.cpp``'s layout, for any shape (the inputs added zeros: 8-bit, codes
    of weights 0; the rows added, 8-bit ones with codes and scale 0), weights over nine decades, groups all of one
    value, zeros and ties; and for a fused layer's parts, one after the other, those of their rows joined."""
    from fournil import kernels
    from fournil.generate.quantize import int4_codes, int8_codes, padded

    if not kernels.instructions():
        pytest.skip("no AVX2 here, or no compiler to build fournil's kernel: the layers use PyTorch's kernels")

    def expected(w):
        if bits == 4:
            codes, scale, zero = int4_codes(padded(w, 32, 16))
            return kernel_layout(codes, 4, scale, zero), None
        codes, scale = int8_codes(padded(w, 32, 1))
        codes = padded((codes + 128).to(torch.uint8), 1, 16)
        return kernel_layout(codes, 8), F.pad(scale, (0, codes.shape[0] - w.shape[0])).to(torch.bfloat16)

    torch.manual_seed(0)
    # w / scale exactly halfway between two codes: 4-bit (-8 to 7: scale 1, zero 0), 8-bit (127 the largest: scale 1)
    ties = torch.tensor([[-8.0, 7.0] + [k + 0.5 for k in range(-8, 7)] * 2,
                         [127.0] + [k + 0.5 for k in range(-15, 16)]])
    uneven = torch.randn(64, 96)
    uneven[3], uneven[5, :32], uneven[7, 40:] = 0, 1.0, -2.0
    weights = [torch.randn(40, 100), torch.randn(48, 128) * torch.logspace(-6, 3, 128), torch.randn(17, 33) ** 3,
               -torch.rand(32, 64), torch.zeros(16, 32), torch.full((20, 70), 0.3), ties, uneven,
               *(torch.randn(int(torch.randint(1, 80, ())), int(torch.randint(1, 200, ()))) for _ in range(10))]
    for w in weights:
        packed, scales = kernels.quantized([w], bits)
        want, want_scales = expected(w)
        assert torch.equal(packed, want), tuple(w.shape)
        assert scales is None if bits == 4 else torch.equal(scales, want_scales)
    for sizes in [(96, 32, 32), (5, 30, 7)]:  # a fused layer's parts, in blocks of 16 rows or not
        parts = [torch.randn(n, 70) for n in sizes]
        packed, scales = kernels.quantized(parts, bits)
        want, want_scales = expected(torch.cat(parts))
        assert torch.equal(packed, want) and (scales is None or torch.equal(scales, want_scales))


@pytest.mark.parametrize("instructions", [1, 2], ids=["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoding_attention_in_fournil_s_cpu_kernel_is_attention_within_fp32_rounding_each_row_on_its_own(
        dtype, instructions):
    """One new token's attention in ``attention.cpp``, with AVX2's instructions or AVX512's (a CPU with AVX512-VNNI
    checks both), over a cache of bf16 or fp32 read as a view with more columns than it fills: within fp32's rounding
    of the exact softmax(q k / sqrt(d)) v, masked slots ignored even when they hold huge values (a cache's free columns
    not even read), any number of keys (a block of 16 or 8, or not) and of query heads per key/value head (1, 3, 7,
    12), head sizes 16 to 128; a row's result the same bit for bit alone, among others, and on one thread or two; a
    row with no key to attend to gets zeros; heads it cannot read, or instructions the CPU lacks, an error that says
    why. A model's step gives the logits it gives without the kernel."""
    from fournil import kernels

    if kernels.instructions() < instructions:
        pytest.skip(f"no {'AVX2' if instructions == 1 else 'AVX512-VNNI'} here, or no compiler to build fournil's "
                    "kernels: attention is PyTorch's")

    def attention(q, k, v, mask):
        return torch.ops.fournil.decode_attention(q, k, v, mask, instructions == 2)

    torch.manual_seed(0)
    for B, H, KV, S, D in [(3, 9, 3, 37, 64), (2, 4, 4, 16, 32), (1, 7, 1, 5, 128), (4, 24, 2, 50, 16)]:
        q = torch.randn(B, H, D)
        k, v = (torch.randn(B, KV, S + 9, D).to(dtype) for _ in range(2))  # (9 columns the view leaves out)
        k, v = k[:, :, :S], v[:, :, :S]
        kk, vv = (t.double().repeat_interleave(H // KV, 1) for t in (k, v))
        scores = q.double()[:, :, None] @ kk.transpose(-1, -2) / D ** 0.5
        everything = attention(q, k, v, None)
        assert (everything.double() - (scores.softmax(-1) @ vv)[:, :, 0]).abs().max() <= 1e-5 * vv.abs().amax()
        mask = torch.rand(B, S) < 0.7
        mask[:, -1] = True
        k[~mask[:, None].expand(B, KV, S)] = 1e30  # what a masked slot holds must not matter
        y = attention(q, k, v, mask)
        exact = (scores.masked_fill(~mask[:, None, None], -torch.inf).softmax(-1) @ vv)[:, :, 0]
        assert (y.double() - exact).abs().max() <= 1e-5 * vv.abs().amax()
        rows = [(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1]) for b in range(B)]
        assert torch.equal(torch.cat([attention(*row) for row in rows]), y)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(3 - threads)  # 1 in a test worker of 2 on 2 cores: the other count too
            assert torch.equal(attention(q, k, v, mask), y)
        finally:
            torch.set_num_threads(threads)
    # a cache's free columns are not read: NaN there, after each row's last key or in whole blocks of 16 before its
    # first, changes nothing, and the result is the one of the cache cut after the last key, bit for bit
    k, v = (torch.randn(4, 2, 100, 32).to(dtype) for _ in range(2))
    q, mask = torch.randn(4, 6, 32), torch.zeros(4, 100, dtype=torch.bool)
    for b, (first, last) in enumerate([(0, 60), (20, 60), (37, 60), (59, 60)]):
        mask[b, first:last] = True
        k[b, :, last:], v[b, :, last:] = torch.nan, torch.nan
        k[b, :, : first // 16 * 16], v[b, :, : first // 16 * 16] = torch.nan, torch.nan
    y = attention(q, k, v, mask)
    assert not y.isnan().any()
    assert torch.equal(y, attention(q, k[:, :, :60].nan_to_num(), v[:, :, :60].nan_to_num(), mask[:, :60].contiguous()))
    mask[0] = False
    assert torch.equal(attention(q, k, v, mask)[0], torch.zeros(6, 32))
    with pytest.raises(RuntimeError, match=r"D a multiple of 16 up to 128"):  # what the op cannot read, it says
        attention(q[..., :8].contiguous(), k[..., :8], v[..., :8], mask)
    # what the CPU has (ATEN_CPU_CAPABILITY=avx2 leaves its AVX512 there, which fournil.kernels.instructions() hides)
    if torch.ops.fournil.instructions() < 2:
        with pytest.raises(RuntimeError, match=r"this CPU lacks the instructions asked for"):
            torch.ops.fournil.decode_attention(q, k, v, mask, True)

    model = build_model({"family": "llama", **SIZES, "n_embd": 64, "n_kv_head": 2}).eval().to(dtype)  # heads of 16
    x = torch.randint(50, (2, 12))
    with torch.no_grad():
        logits = {}
        for kernel in (instructions, 0):
            cache = model.new_cache(2, 40, dtype)
            assert cache.kernel == kernels.instructions()
            cache.kernel = kernel
            model(x[:, :-1], cache)
            logits[kernel] = model(x[:, -1:], cache).float()
    assert torch.allclose(logits[instructions], logits[0], atol=1e-5 if dtype == torch.float32 else 0.05)


def test_built_kernels_load_at_the_next_launch_without_pytorch_s_builder():
    """Once built, the kernels of the same sources load directly: no build, and no import of PyTorch's builder
    (0.1 s of every launch), whichever install built them."""
    import subprocess
    import sys

    from fournil import kernels

    if not kernels.built():
        pytest.skip("fournil's kernels are not built on this machine (no C++ compiler, or not an x86 CPU)")
    code = ("import sys; from fournil import kernels\n"
            "print(kernels.built(), 'torch.utils.cpp_extension' in sys.modules, kernels.library().exists())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True"]
    assert "building its C++ kernels" not in out.stderr


def test_without_a_compiler_quantized_layers_say_so_once_and_use_pytorch_s_kernels(tmp_path):
    """A CPU with AVX2 but no C++ compiler to build fournil's kernels: a line saying they are being built, one warning
    that says what to install, then PyTorch's kernels (as on ARM), which give the layers' answers all the same: int4,
    and int8 for a decoding step's rows (in bf16) and a prompt's (in fp32)."""
    import os
    import subprocess
    import sys

    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from fournil import kernels; from fournil.generate.quantize import Int4Linear, Int8Linear\n"
            # a build that stopped halfway is built again (here, with no compiler, cannot be)
            "kernels.library().parent.mkdir(parents=True); kernels.library().write_bytes(b'half a library')\n"
            "torch.manual_seed(0); linear = torch.nn.Linear(64, 32); w = linear.weight.detach()\n"
            # half a quantization step per weight (int4: its group's range / 15; int8: its row's largest |w| / 127)
            "g = w.view(32, 2, 32); int4 = ((g.amax(-1) - g.amin(-1)) / 30).repeat_interleave(32, 1)\n"
            "int8 = (w.abs().amax(1, True) / 254).expand(-1, 64)\n"
            "for layer, half in [(Int4Linear(linear), int4), (Int8Linear(linear), int8)]:\n"
            "    for rows in (3, 40):\n"
            # and bf16's rounding of the kernel's inputs, weights and output
            "        x = torch.randn(rows, 64); bound = x.abs() @ (1.2 * half).T + 2 ** -7 * (x.abs() @ w.abs().T)\n"
            "        print(bool(layer.kernel), bool(((layer(x) - linear(x)).abs() <= bound).all()))\n"
            "print(bool(kernels.instructions()))")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"] * 4 + ["False"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # elsewhere there is nothing to build
        assert out.stderr.count("UserWarning: int8 and int4 layers, decoding's attention and dropout use PyTorch's") == 1
        assert f"could not be built with {env['CXX']!r}; install a C++ compiler (g++)" in out.stderr
        assert out.stderr.count("fournil: building its C++ kernels, once for this machine") == 1  # said before
        assert "Traceback" not in out.stderr
