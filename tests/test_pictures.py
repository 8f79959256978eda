"""Pictures of the real computation: attention maps recorded from the model's own forward pass."""
import pytest
import torch
from conftest import CLI
from matplotlib.image import imread

from fournil.evaluate.attention import attention_maps, recording_attention
from fournil.plots.embeddings import principal_components, token_embeddings
from fournil.runs import Run


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
    result = cli("attention", bpe_llama, "--out", "all.png")
    n = len(Run.load(bpe_llama, "cpu").tokenizer.encode("The animal didn't cross the street because it was too tired"))
    assert f"{n} tokens, 2 layers x 4 heads; layer 1 -> all.png" in result.stdout
    assert "'\u2423it' attends most to:" in result.stdout
    every_head = imread(tmp_path / "all.png")
    cli("attention", bpe_llama, "--layer", "0", "--head", "2", "--out", "one.png")
    one_head = imread(tmp_path / "one.png")
    assert every_head.shape[2] == 4 and every_head.shape[:2] == (1020, 1440)  # 2 rows of 4 maps, then the row of "it"
    assert one_head.shape[:2] == (680, 360)  # one map, then the row
    for args, message in {("--layer", "5"): "--layer 5: the model has 2 layers", ("--head", "9"): "--head 9: the model has 4 heads"}.items():
        result = cli("attention", bpe_llama, *args, check=False)
        assert result.returncode == 2 and message in result.stderr
    result = cli("attention", trained["ngram"], "emma", check=False)
    assert result.returncode == 2 and "has no attention to show" in result.stderr


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
    assert imread(tmp_path / "e.png").shape[:2] == (800, 800)
    result = CLI(tmp_path)("embeddings", trained["ngram"], check=False)
    assert result.returncode == 2 and "has no token embeddings" in result.stderr
