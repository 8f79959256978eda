"""The generation engine: a key/value cache that changes nothing, batches that change nothing, and every control."""
import pytest
import torch

from fournil.generate import SamplingParams, complete, score, stream
from fournil.generate.engine import TextStream, generate_steps
from fournil.models import build_model
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


def test_stream_and_long_text_beyond_the_context(cli, tmp_path):
    cli("train", "--data", "shakespeare", "--model", "gpt", "--n-embd", "32", "--n-layer", "1", "--block-size", "16",
        "--steps", "10", "--eval-every", "10", "--quiet", "--out", "tiny")
    run = Run.load(tmp_path / "tiny", "cpu")
    params = SamplingParams(max_new_tokens=60, temperature=0.8, seed=3)
    pieces = list(stream(run.model, run.tokenizer, run.tokenizer.prompt_ids("KING"), params))
    assert len(pieces) == 60  # 4 + 60 tokens in a context of 16: the cache was refilled from the last half
    steps = list(generate_steps(run.model, [run.tokenizer.prompt_ids("KING")], params))
    assert [p.token for p in pieces] == [int(s.tokens[0]) for s in steps]
