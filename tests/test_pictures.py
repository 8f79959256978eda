"""Pictures of the real computation: attention maps recorded from the model's own forward pass."""
import math

import pytest
import torch
from conftest import CLI
from matplotlib.image import imread

from fournil.cli.measuring import heading
from fournil.errors import FournilError
from fournil.evaluate.attention import attention_maps, recording_attention
from fournil.evaluate.explain import framed
from fournil.plots.embeddings import principal_components, token_embeddings
from fournil.plots.explain import figure_size, plot_token_probs
from fournil.plots.tokens import CELL, COLUMNS, ROW, layout
from fournil.runs import Run


def drawn_at(png, width: float, height: float) -> bool:
    """Whether a picture is a figure of width x height inches at 100 dpi, to the pixel that matplotlib before 3.11
    loses when it truncates a size such as 3.4 * 3 * 100 = 1019.999... (later versions round it to 1020)."""
    h, w = imread(png).shape[:2]
    return abs(h - 100 * height) < 1 and abs(w - 100 * width) < 1


@pytest.mark.parametrize("which", ["gpt", "llama"])
def test_attention_maps_are_the_weights_the_forward_pass_used(which, trained, bpe_llama):
    run = Run.load(trained["gpt"] if which == "gpt" else bpe_llama, "cpu")
    text = "emmaolivia" if which == "gpt" else "The animal didn't cross the street because it was too tired"
    tokens, weights = attention_maps(run.model, run.tokenizer, text)
    T = len(tokens)
    assert weights.shape == (run.model.config.n_layer, run.model.config.n_head, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)  # each row a distribution
    assert weights.triu(1).abs().max() == 0  # no token reads a later one
    x = torch.tensor([run.tokenizer.encode(text)])
    with torch.no_grad():
        fused = run.model(x)  # PyTorch's fused attention, which never forms the weights
        with recording_attention(run.model):
            explicit = run.model(x)  # the weights formed, kept, and used
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_attention_command_draws_a_png_and_names_what_a_token_reads(bpe_llama, trained, tmp_path):
    cli = CLI(tmp_path)
    animal = "The animal didn't cross the street because it was too tired"
    result = cli("attention", bpe_llama, animal, "--out", "all.png")
    n = len(Run.load(bpe_llama, "cpu").tokenizer.encode(animal))
    assert f"{n} tokens, 2 layers x 4 heads; layer 1 -> all.png" in result.stdout
    assert "'\u2423it' attends most to:" in result.stdout
    cli("attention", bpe_llama, animal, "--layer", "0", "--head", "2", "--out", "one.png")
    assert imread(tmp_path / "all.png").shape[2] == 4
    assert drawn_at(tmp_path / "all.png", 4 * 3.6, 3 * 3.4)  # 2 rows of 4 maps, then the row of "it"
    assert drawn_at(tmp_path / "one.png", 3.6, 2 * 3.4)  # one map, then the row
    for args, message in {("--layer", "5"): "--layer 5: the model has 2 layers", ("--head", "9"): "--head 9: the model has 4 heads"}.items():
        result = cli("attention", bpe_llama, *args, check=False)
        assert result.returncode == 2 and message in result.stderr
    long = cli("attention", bpe_llama, "the cat " * 250, check=False)  # (about 750 tokens: within the context of 1,024)
    assert long.returncode == 2 and "an attention map shows 512 at most" in long.stderr
    for family in ("ngram", "mlp"):  # (said before the default text, whose characters names do not have, is read)
        result = cli("attention", trained[family], check=False)
        assert result.returncode == 2 and f"the {family} model has no attention to show" in result.stderr


def test_embeddings_command_draws_the_principal_components_of_the_model_embeddings(trained, tmp_path):
    run = Run.load(trained["mlp"], "cpu")
    weights = token_embeddings(run.model)
    assert torch.equal(weights, run.model.wte.weight.detach()[: run.tokenizer.vocab_size])
    points, shares = principal_components(weights)
    total = (weights - weights.mean(0)).pow(2).sum()
    assert points.pow(2).sum(0) / total == pytest.approx(shares.tolist(), abs=1e-5)  # the variance each explains
    assert shares[0] >= shares[1]
    result = CLI(tmp_path)("embeddings", trained["mlp"], "--out", "e.png")
    assert f"{100 * shares.sum():.1f} % of their variance -> e.png" in result.stdout
    assert drawn_at(tmp_path / "e.png", 8, 8)
    result = CLI(tmp_path)("embeddings", trained["ngram"], check=False)
    assert result.returncode == 2 and "has no token embeddings" in result.stderr


@pytest.mark.precision
def test_explain_gives_each_token_the_probability_of_the_models_own_forward_pass(bpe_llama, tmp_path):
    run = Run.load(bpe_llama, "cpu")
    text = "The king is dead, long live the king"
    result = run.explain(text, top=3)
    ids = run.tokenizer.encode(text)
    assert framed(run.tokenizer, text) == [run.tokenizer.bos_id, *ids]  # the model reads documents after a BOS
    ids = [run.tokenizer.bos_id, *ids]
    with torch.no_grad():
        logprobs = run.model(torch.tensor([ids]))[0].log_softmax(-1)
    rows = result["rows"]
    assert len(rows) == len(ids) - 1 and rows[0]["label"] == "The"
    for t, row in enumerate(rows, start=1):
        assert row["logprob"] == pytest.approx(logprobs[t - 1, ids[t]].item(), abs=1e-5)
        best = logprobs[t - 1].topk(3)
        assert [p for _, p in row["top"]] == pytest.approx(best.values.exp().tolist(), abs=1e-6)
        assert row["rank"] == min(1 + (logprobs[t - 1] > logprobs[t - 1, ids[t]]).sum().item(), 4)
    assert result["nll"] == pytest.approx(-sum(r["logprob"] for r in rows))
    emoji = [row["label"] for row in run.explain("the king\U0001f642")["rows"]][-4:]
    assert emoji == ["<F0>", "<9F>", "<99>", "<82>"]  # each part of the character as its byte (each was "\ufffd")
    assert attention_maps(run.model, run.tokenizer, "king\U0001f642")[0][-4:] == emoji

    out = CLI(tmp_path)("explain", bpe_llama, text, "--top", "2", "--out", "p.png").stdout.splitlines()
    assert len(out) == len(rows) + 1 and out[-1].startswith(f"NLL {result['nll']:.4f} nats over {len(rows)} transitions")
    label, prob, _, rank, *_ = out[0].split()
    assert label == rows[0]["label"] and float(prob) == pytest.approx(rows[0]["prob"], abs=1e-4)
    refused = CLI(tmp_path)("explain", bpe_llama, "", check=False)  # BOS alone: nothing to predict
    assert refused.returncode == 2 and "give a longer text" in refused.stderr and "Traceback" not in refused.stderr
    assert drawn_at(tmp_path / "p.png", *figure_size(len(rows))) and figure_size(len(rows))[1] == 4.8  # one line
    for words, lines in ((25, 2), (400, 20)):  # a long text fills lines of 45 bars, 20 at most (it drew 1,000 bars
        # 0.02 inch wide, their labels one black smear)
        tokens = len(run.tokenizer.encode("the king " * words))
        assert 45 * (lines - 1) < min(tokens, 900) <= 45 * lines
        CLI(tmp_path)("explain", bpe_llama, "the king " * words, "--out", "long.png")
        assert drawn_at(tmp_path / "long.png", 24, 1.8 + 3 * lines)
    long = "The capital of France is Paris, and the capital of Italy is Rome."  # the title says where it was cut
    assert heading(run, long) == f"{run.path.name}: {long[:59]}…" and heading(run, text) == f"{run.path.name}: {text}"


def test_explain_of_a_bigram_gives_the_probabilities_of_its_counts(trained, tmp_path):
    run = Run.load(trained["ngram"], "cpu")
    model = run.model

    def counted(previous: int, following: int) -> float:  # log P(following | previous) from the smoothed counts
        row = (model.contexts == previous).nonzero().item()
        cells = slice(model.starts[row], model.starts[row + 1])  # the next tokens seen after it, and their counts
        seen = dict(zip(model.tokens[cells].tolist(), model.counts[cells].tolist()))
        k, vocab = model.config.smoothing, model.config.vocab_size
        return math.log((seen.get(following, 0) + k) / (sum(seen.values()) + k * vocab))

    result = run.explain("emma")
    b, e, m, a = run.tokenizer.boundary_id, *run.tokenizer.encode("ema")
    assert [r["label"] for r in result["rows"]] == [".e", "em", "mm", "ma", "a."]
    expected = [counted(b, e), counted(e, m), counted(m, m), counted(m, a), counted(a, b)]
    assert [r["logprob"] for r in result["rows"]] == pytest.approx(expected, abs=1e-6)
    assert [len(r["top"]) for r in run.explain("emma", top=1)["rows"]] == [1] * 5
    plot_token_probs(result, tmp_path / "emma.png", heading(run, "emma"))  # a short word's picture is narrow:
    title = imread(tmp_path / "emma.png")[:40, :, :3]  # its title must fit it, not run off both sides
    assert title.min() < 0.5 and (title[:, :8] == 1).all() and (title[:, -8:] == 1).all()
    with pytest.raises(FournilError, match="--top -1: show at least 1 alternative"):  # not all but the last
        run.explain("emma", top=-1)
    for args, said in ((("emma", "2"), "--top '2': give a whole number of alternatives to show"),
                       ((123,), "the text to explain must be a string (got int 123)")):  # (TypeErrors before)
        with pytest.raises(FournilError) as e:
            run.explain(*args)
        assert str(e.value) == said


def test_tokenize_draws_each_tokenizers_cuts_with_their_counts(bpe_llama, tmp_path):
    assert layout(["ab", "cde", "\n", "fg"], columns=4) == [[(0, "ab")], [(0, "cde"), (3, "\u21b5")], [(0, "fg")]]
    result = CLI(tmp_path)("tokenize", "To be, or not to be", "--tokenizer", "char", "--tokenizer", bpe_llama)
    assert result.stdout.splitlines()[0] == "== characters"
    assert "19 characters, 19 bytes, 19 tokens: 1.00 bytes per token" in result.stdout
    rows = 2 * (1 + 1.6)  # two panels of one line each
    assert drawn_at(tmp_path / "tokens.png", COLUMNS * CELL + 0.4, rows * ROW + 0.2)
    CLI(tmp_path)("tokenize", "To be, or not to be. " * 150, "--tokenizer", bpe_llama, "--out", "long.png")
    header = imread(tmp_path / "long.png")[: int(1.2 * ROW * 100), :, :3]  # 3,150 characters: a long header
    assert header.min() < 0.5 and header[:, -int(0.3 * 100):].min() == 1.0  # drawn, and ending before the margin


def test_pictures_draw_token_labels_as_written_and_leave_matplotlib_as_they_found_it(tmp_path):
    """A token "$$" made matplotlib read its label as TeX and fail (SmolLM2's embeddings with --limit 100000); labels
    are drawn as written now, without changing how the user's own plots draw theirs."""
    import matplotlib

    from fournil.plots.attention import plot_attention

    weights = torch.ones(1, 3, 3).tril()
    plot_attention(["$$", "$x$", "a$b"], weights / weights.sum(-1, keepdim=True), tmp_path / "a.png", 0, focus=2)
    assert imread(tmp_path / "a.png").shape == (680, 720, 4)  # the head, their average, the row of "a$b"
    assert matplotlib.rcParams["text.parse_math"]
