"""The count model's likelihood is exact: check it against counts taken by hand."""
import math
from collections import Counter

import pytest
import torch

import fournil
from fournil.config import DataConfig, RunConfig, TrainConfig
from fournil.data import load_splits
from fournil.errors import FournilError


def nll_from_counts(train_docs, test_docs, n: int, k: float) -> float:
    """Average NLL per token of an add-k n-gram model, straight from the counts (``.`` = boundary)."""
    pairs, contexts = Counter(), Counter()
    frame = lambda w: ["."] * (n - 1) + list(w) + ["."]  # noqa: E731
    for w in train_docs:
        s = frame(w)
        for i in range(n - 1, len(s)):
            pairs[tuple(s[i - n + 1 : i + 1])] += 1
            contexts[tuple(s[i - n + 1 : i])] += 1
    vocab = len(set("".join(train_docs))) + 1
    total, count = 0.0, 0
    for w in test_docs:
        s = frame(w)
        for i in range(n - 1, len(s)):
            p = (pairs[tuple(s[i - n + 1 : i + 1])] + k) / (contexts[tuple(s[i - n + 1 : i])] + k * vocab)
            total -= math.log(p)
            count += 1
    return total / count


@pytest.mark.parametrize("n, k", [(2, 1.0), (3, 0.1)])
def test_ngram_test_nll_on_prenoms_equals_the_counts(tmp_path, n, k):
    config = RunConfig(model={"family": "ngram", "n": n, "smoothing": k}, data=DataConfig("prenoms"),
                       train=TrainConfig(samples=0, steps=500, lr=0.1))
    said = []
    run = fournil.train(config, out=str(tmp_path / "run"), progress=False, announce=said.append)
    # what the training loop would read is said not to apply (it was left unread without a word)
    assert said[0] == ("(an n-gram is counted in one pass over the training split, not trained step by step: --steps, "
                       "--lr do not apply)")
    assert said[1].startswith(f"ngram; lines data prenoms; vocabulary 46, context {n - 1};")  # what it reads, not 21
    splits, _ = load_splits(DataConfig("prenoms"))
    expected = nll_from_counts(splits.train, splits.test, n, k)
    assert run.evaluate(["test"])["test"]["nll"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(FournilError, match="no split named 'tests': a run is scored on train, val or test"):
        run.evaluate(["tests"])
    with pytest.raises(FournilError, match="no split named 'dev'"):  # (the data of the others, without a word)
        run.data(["val", "dev"])
    assert list(run.data("val")) == ["val"]  # a split's name, not its letters
    assert run.evaluate("test")["test"]["nll"] == pytest.approx(expected, abs=1e-6)  # one split by its name
    with pytest.raises(FournilError, match="max_tokens=0: score at least 1 token"):  # (ZeroDivisionError before)
        run.evaluate(["test"], max_tokens=0)
    with pytest.raises(FournilError, match="was not fine-tuned on instructions: it has no held-out prompts"):
        run.answer_val_prompts(2)
    run.quantize("bfloat16")  # (``--dtype bfloat16``: a count model has no weights to round, its counts stay exact)
    assert run.evaluate(["test"])["test"]["nll"] == pytest.approx(expected, abs=1e-6)
    if n == 2:  # the bigram table: a row per token as context (the boundary too), a column per next token
        assert run.model.num_params() == run.tokenizer.vocab_size ** 2
        assert 2.4 < expected < 2.6  # the course's bigram on English names: 2.47


def test_the_table_keeps_only_the_counts_seen_and_reads_the_dense_rows_of_before(tmp_path):
    """A row per context seen, dense over the vocabulary, took 3 GB for a trigram over 4,096 BPE tokens of Shakespeare
    (5 MB as cells); a run counted then still reads, with the same scores."""
    from fournil.checkpoint import save_tensors
    from fournil.runs import Run

    config = RunConfig(model={"family": "ngram", "n": 3}, data=DataConfig("prenoms"), train=TrainConfig(samples=0))
    run = fournil.train(config, out=str(tmp_path / "run"), progress=False, announce=lambda *_: None)
    model, nll = run.model, run.evaluate(["test"])["test"]["nll"]
    cells, contexts = len(model.counts), len(model.contexts)
    assert cells < model.num_params() / 5  # most of the table's cells are 0
    assert (tmp_path / "run" / "model.safetensors").stat().st_size < 8 * (3 * cells + 2 * contexts) + 1024
    dense = torch.zeros(contexts, model.config.vocab_size, dtype=torch.float64)
    dense[torch.repeat_interleave(torch.arange(contexts), model.starts.diff()), model.tokens] = model.counts
    save_tensors({"contexts": model.contexts, "counts": dense}, tmp_path / "run" / "model.safetensors")
    again = Run.load(tmp_path / "run", "cpu")
    assert all(torch.equal(getattr(again.model, k), getattr(model, k))
               for k in ("contexts", "starts", "tokens", "counts"))
    assert again.evaluate(["test"])["test"]["nll"] == nll
