import pytest
import torch

from fournil.errors import FournilError
from fournil.generate.sampling import SamplingParams, choose, draw, filter_logits, most_likely_tokens, penalize


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, 1.0, top_k=2, top_p=None).isfinite()
    assert kept.tolist() == [[False, True, True, False]]


def test_most_likely_tokens_are_pytorch_s_argmax_first_of_equals_first():
    torch.manual_seed(0)
    logits = torch.randn(6, 49152)
    logits[1, [7, 300, 40000]] = 50.0  # a tie: the first
    logits[2] = 1.0  # all equal
    logits[3, :100] = float("-inf")
    logits[4, [9, 11]] = float("inf")
    logits[5, 123] = float("nan")  # (a broken model's scores: NaN counts as the largest, in both)
    assert most_likely_tokens(logits) == logits.argmax(-1).tolist()
    assert most_likely_tokens(logits)[1:3] == [7, 0]
    assert most_likely_tokens(logits.bfloat16()) == logits.bfloat16().argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_with_that_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: filter_logits(probs.log(), 1.0, None, p).isfinite().tolist()  # noqa: E731
    assert kept(0.5) == [[True, False, False, False]]
    assert kept(0.6) == [[True, True, False, False]]
    assert kept(0.81) == [[True, True, True, False]]
    assert kept(1.0) == [[True, True, True, True]]
    assert kept(5e-324) == [[True, False, False, False]]  # 0 in float32: the best token is still kept


def test_top_p_over_a_large_vocabulary_keeps_what_sorting_every_token_keeps():
    """Peaked scores, whose 256 most likely tokens hold top_p (looked at alone), and flat ones, whose do not (sorted
    all): the same tokens kept as by sorting all of SmolLM2's 49,152 probabilities."""
    torch.manual_seed(0)
    paths = set()
    for scale, top_p in ((5.0, 0.9), (5.0, 0.3), (0.1, 0.9), (1.0, 0.999)):
        logits = torch.randn(3, 49152) * scale
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        assert torch.equal(filter_logits(logits, 1.0, top_p=top_p).isfinite(), ~drop.scatter(-1, order, drop))
        paths.add(bool((probs[:, :256].sum(-1) >= top_p).all()))
    assert paths == {True, False}


def test_extreme_settings_still_choose_a_token():
    """Found by the server's fuzzer: a temperature of 1e-300 divided logits into inf (then NaN), a top_p of 5e-324
    dropped every token; both must give the most likely token, not a crash."""
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    generator = torch.Generator().manual_seed(0)
    for p in (SamplingParams(temperature=1e-300), SamplingParams(top_p=5e-324), SamplingParams(min_p=1.0)):
        assert choose(logits, p, generator).tolist() == [1]


def test_a_draw_follows_each_row_s_probabilities_and_never_takes_an_impossible_token():
    """200,000 draws land on each token as often as its probability says (within 4.5 standard deviations), from
    rows that need not sum to 1; a token of probability 0 is never drawn, even first in its row; broken scores are
    said, not drawn from."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0]) * 3  # (unnormalized)
    n = 200_000
    counts = torch.bincount(draw(probs.expand(n, -1), generator), minlength=7).double() / n
    expected = (probs / probs.sum()).double()
    assert (counts - expected).abs().max() <= 4.5 * (expected * (1 - expected) / n).sqrt().max()
    assert counts[[0, 2, 6]].tolist() == [0, 0, 0]
    rows = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # one certain token per row
    assert all(draw(rows, generator).tolist() == [2, 0, 1] for _ in range(100))
    assert draw(torch.tensor([0.0, 5.0]), generator).shape == ()  # one row: one token
    for broken in (float("nan"), float("inf")):
        with pytest.raises(FournilError, match="NaN or infinity"):
            draw(torch.tensor([[0.5, broken]]), generator)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    cold = filter_logits(logits, 0.5, None, None).softmax(-1)[0, 1]
    hot = filter_logits(logits, 2.0, None, None).softmax(-1)[0, 1]
    assert cold > logits.softmax(-1)[0, 1] > hot


def test_min_p_keeps_tokens_near_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), 1.0, min_p=0.25).isfinite().tolist()
    assert kept == [[True, True, True, False]]  # 0.05 < 0.25 * 0.5


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0]])
    out = penalize(logits, seen, counts, SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    # repetition: 2 / 2 = 1, -1 * 2 = -2 (seen ones only); then - 0.5 * count - 0.25 * (count > 0)
    assert out.tolist() == [[1.0, -2.0 - 1.0 - 0.25, 0.5, 1.0 - 0.5 - 0.25]]
    biased = penalize(logits, seen, counts, SamplingParams(logit_bias={0: -100, 2: 1.5}))  # (OpenAI's logit_bias)
    assert biased.tolist() == [[-98.0, -1.0, 2.0, 1.0]] and logits.tolist() == [[2.0, -1.0, 0.5, 1.0]]


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": 2.0},
                                 {"repetition_penalty": 0.0}, {"repetition_penalty": 1e-308},
                                 {"repetition_penalty": 1e3}, {"frequency_penalty": 3.0}, {"max_new_tokens": 0},
                                 {"logit_bias": {1: 101}}, {"logit_bias": {"1": 2}}, {"logit_bias": [1]}])
def test_bad_controls(bad):
    with pytest.raises(FournilError):
        SamplingParams(**bad).check()


def test_the_python_api_says_which_setting_has_the_wrong_type(trained):
    from fournil.runs import Run

    run = Run.load(trained["gpt"], "cpu")
    # (a TypeError from the seed's arithmetic, from a comparison, or from torch.topk before)
    for given, said in (({"seed": "a"}, "sampling setting seed = 'a': expected a whole number"),
                        ({"temperature": "hot"}, "sampling setting temperature = 'hot': expected a number"),
                        ({"top_k": 2.5}, "sampling setting top_k = 2.5: expected a whole number"),
                        ({"n": "3"}, "n must be a whole number, at least 1 (got '3')")):
        with pytest.raises(FournilError) as e:
            run.sample(**given)
        assert str(e.value) == said
    assert len(run.sample(2, seed=3, temperature=1, top_p=1)) == 2  # whole numbers are numbers
