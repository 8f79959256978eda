"""Muon: what it does to a matrix, which weights it takes, and that the rest is AdamW exactly; the learning rate's
schedule."""
import copy
import json
import math

import pytest
import torch

import fournil
from fournil.config import DataConfig, RunConfig, TrainConfig
from fournil.errors import FournilError
from fournil.models.gpt import GPT, GPTConfig
from fournil.train.muon import Muon, hidden_matrices, orthogonalize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (48, 48)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_out_the_singular_values(shape, dtype):
    torch.manual_seed(0)
    k = min(shape)
    U, V = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    S = torch.logspace(-1, 0, k)  # singular values from 0.1 to 1, as unequal as a gradient's
    g = (U * S) @ V.T * 7.0
    o = orthogonalize(g, dtype=dtype)
    assert o.shape == g.shape and o.dtype == g.dtype
    inner = U.T @ o @ V  # diagonal when o = U S' V^T: the singular vectors are kept
    rounding = max(1e-3, 4 * torch.finfo(dtype).eps)  # bf16: a few of its roundings (measured up to 0.016)
    assert (inner - torch.diag(torch.diagonal(inner))).abs().max() < rounding
    assert 0.6 < torch.diagonal(inner).min() and torch.diagonal(inner).max() < 1.25  # the values near one


def test_muon_takes_the_hidden_matrices_and_leaves_embeddings_to_adamw():
    model = GPT(GPTConfig(vocab_size=27, block_size=16, n_layer=2, n_head=2, n_embd=16))
    names = {n for n, p in model.named_parameters() if id(p) in hidden_matrices(model)}
    assert names == {f"transformer.h.{i}.{w}.weight" for i in range(2)
                     for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_the_adamw_groups_of_muon_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=27, block_size=16, n_layer=2, n_head=2, n_embd=16))
    twin = copy.deepcopy(model)
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},  # noqa: E731
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    ours, theirs = Muon(groups(model), lr=1e-2, betas=(0.9, 0.99)), torch.optim.AdamW(groups(twin), lr=1e-2, betas=(0.9, 0.99))
    x = torch.randint(0, 27, (4, 16))
    for _ in range(5):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).logsumexp(-1).mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_muon_orthogonalizes_in_the_precision_of_the_runs_products():
    """bf16 where a run computes in bf16 (there it took a third of fp32's time on a CPU with AMX), else fp32."""
    from fournil.train.trainer import make_optimizer

    torch.manual_seed(0)
    models = {dtype: GPT(GPTConfig(vocab_size=27, block_size=16, n_layer=1, n_head=2, n_embd=32))
              for dtype in (torch.float32, torch.bfloat16)}
    models[torch.bfloat16].load_state_dict(models[torch.float32].state_dict())
    x, moved = torch.randint(0, 27, (4, 16)), {}
    for dtype, model in models.items():
        before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
        optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-2), torch.device("cpu"), dtype)
        model(x).logsumexp(-1).mean().backward()  # (in fp32 both: only the optimizer's precision differs)
        optimizer.step()
        moved[dtype] = model.transformer.h[0].mlp.c_fc.weight.detach() - before
    # the same direction, not the same numbers: the iteration magnifies the rounding of the smallest singular values
    # (training with either reached the same val NLL: docs/benchmarks.md)
    cosine = torch.nn.functional.cosine_similarity(moved[torch.bfloat16].flatten(), moved[torch.float32].flatten(), 0)
    assert 0.98 < cosine < 1 - 1e-4  # (0.991-0.995 measured over four seeds)


def test_a_muon_step_moves_a_matrix_as_far_as_an_adamw_step_would():
    w = torch.nn.Parameter(torch.zeros(64, 256))
    opt = Muon([{"params": [w], "muon": True, "weight_decay": 0.0}], lr=1e-2)
    w.grad = torch.randn(64, 256)
    opt.step()
    rms = w.detach().pow(2).mean().sqrt().item()
    assert 0.15e-2 < rms < 0.25e-2  # AdamW's first steps move each weight by lr; its updates' RMS is about 0.2 lr


def test_the_optimizer_is_recorded_and_bad_choices_are_explained(tmp_path):
    config = lambda **t: RunConfig(model={"family": "gpt", "n_embd": 16, "n_layer": 1},  # noqa: E731
                                   data=DataConfig("names"), train=TrainConfig(steps=2, eval_every=2, samples=0, **t))
    # the gpt's default on names is Muon, with more weight decay; that decay was tuned for Muon, not for AdamW
    for optimizer, decay, expected in [(None, None, ("muon", 0.3)), ("adamw", None, ("adamw", 0.1)),
                                       ("adamw", 0.2, ("adamw", 0.2)), ("muon", None, ("muon", 0.3))]:
        out = tmp_path / f"{optimizer}-{decay}"
        fournil.train(config(optimizer=optimizer, weight_decay=decay), out=str(out), progress=False,
                      announce=lambda *_: None)
        train = json.loads((out / "config.json").read_text())["train"]
        assert (train["optimizer"], train["weight_decay"]) == expected
    with pytest.raises(FournilError, match="optimizer 'sgd' is not one fournil has: choose adamw or muon"):
        fournil.train(config(optimizer="sgd"), out=str(tmp_path / "sgd"), progress=False)
    with pytest.raises(FournilError, match=r"train takes a RunConfig, not a TrainConfig: e.g. RunConfig\(model="):
        fournil.train(TrainConfig(steps=2))
    with pytest.raises(FournilError, match="train with --optimizer adamw under --fsdp"):
        fournil.train(config(optimizer="muon", fsdp=True), out=str(tmp_path / "fsdp"), progress=False)


def test_the_warmup_takes_at_most_a_tenth_of_the_budget():
    """200 steps of warmup would be all of a 100-step run: it ends after the budget's first tenth instead, steps or
    time alike; a long run warms up over its 200 steps as before."""
    from fournil.train.trainer import lr_at

    cosine = lambda progress: 0.5 * (1 + math.cos(math.pi * progress))  # noqa: E731
    short = TrainConfig(steps=100, lr=1e-3, warmup=200)
    assert lr_at(0, 0.0, short) == pytest.approx(1e-3 / 10)
    assert lr_at(4, 0.04, short) == pytest.approx(1e-3 * 0.5 * cosine(0.04))
    assert lr_at(9, 0.09, short) == pytest.approx(1e-3 * cosine(0.09))
    timed = TrainConfig(time=60, lr=1e-3, warmup=200)
    assert lr_at(3, 0.05, timed) == pytest.approx(1e-3 * 0.5 * cosine(0.05))  # 3 steps in the first 3 seconds
    assert lr_at(7, 0.1, timed) == pytest.approx(1e-3 * cosine(0.1))
    long = TrainConfig(steps=10_000, lr=1e-3, warmup=200)
    assert lr_at(99, 0.0099, long) == pytest.approx(1e-3 * 0.5 * cosine(0.0099))
    assert lr_at(199, 0.0199, long) == pytest.approx(1e-3 * cosine(0.0199))
