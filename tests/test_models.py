import copy
import functools

import pytest
import torch
from torch import nn

from fournil.checkpoint import unique_state
from fournil.errors import FournilError
from fournil.models import FAMILIES, build_model

V, T = 11, 9


def make(family, **kw):
    model = build_model({"family": family, "vocab_size": V, "block_size": T, **kw})
    if family == "ngram":
        x = torch.randint(V, (8, T))
        model.fit([(x, torch.roll(x, -1, 1))])
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_model_answers_the_same_call(family):
    model = make(family)
    source = (torch.randint(1, V, (3, 5)),) if family == "seq2seq" else ()  # and an encoder-decoder reads a source
    logits = model(*source, torch.randint(V, (3, T)))
    assert logits.shape == (3, T, V)
    assert torch.isfinite(logits).all()
    assert model.num_params() > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_model_built_with_its_weights_is_the_saved_one_tied_as_it_was(family):
    """Built on the meta device and given its weights (no initial ones drawn), a model keeps its computed buffers
    (the rotary frequencies) and its tied weights, and trains as one built the usual way."""
    model = make(family).eval()
    config = {"family": family, "vocab_size": V, "block_size": T}
    state = {k: v.clone() for k, v in unique_state(model).items()}  # (the loaded model's own tensors, not these)
    loaded = build_model(config, state).eval()
    source = (torch.randint(1, V, (3, 5)),) if family == "seq2seq" else ()
    x = torch.randint(V, (3, T))
    assert torch.equal(loaded(*source, x), model(*source, x))

    def names(m):  # each weight's names: several for a tied one
        found = {}
        for name, p in m.named_parameters(remove_duplicate=False):
            found.setdefault(id(p), []).append(name)
        return sorted(found.values())

    tied = any(len(group) > 1 for group in names(model))
    assert names(loaded) == names(model) and tied == (family in ("gpt", "llama", "seq2seq"))
    if family != "ngram":  # (its counts are buffers)
        assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
        for m in (model, loaded):  # one step of gradient descent: a tie kept in name only would move twice
            m(*source, x).logsumexp(-1).mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
        assert all(torch.equal(a, b) for a, b in zip(unique_state(loaded).values(), unique_state(model).values()))
        name = next(iter(state))  # (refused before any is taken)
        with pytest.raises(FournilError, match=rf"w.st does not match its config: {name} is \[2, 3\], the config "
                                               rf"makes it \[{', '.join(map(str, state[name].shape))}\]"):
            build_model(config, {**state, name: torch.zeros(2, 3)}, "w.st")
        with pytest.raises(FournilError, match=rf"w.st does not match its config \(missing \['{name}'\], unexpected "
                                               r"\['extra'\]\)"):
            build_model(config, {**{k: v for k, v in state.items() if k != name}, "extra": torch.zeros(1)}, "w.st")


@pytest.mark.parametrize("family", ["ngram", "mlp", "rnn", "gpt", "llama"])
def test_models_are_causal(family):
    """A prediction at position t never depends on tokens after t."""
    model = make(family).eval()
    x = torch.randint(V, (1, T))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % V
    assert torch.allclose(model(x)[0, :5], model(y)[0, :5], atol=1e-6)
    assert not torch.allclose(model(x)[0, 5:], model(y)[0, 5:])


def test_parameter_counts_are_the_textbook_ones():
    mlp = make("mlp", context=3, n_embd=10, n_hidden=200, n_layer=1)
    assert mlp.num_params() == (V + 1) * 10 + (30 * 200 + 200) + (200 * V + V)
    gpt = make("gpt", n_layer=1, n_head=2, n_embd=8)
    per_block = 2 * 2 * 8 + (8 * 24 + 24) + (8 * 8 + 8) + (8 * 32 + 32) + (32 * 8 + 8)
    assert gpt.num_params() == V * 8 + T * 8 + per_block + 2 * 8  # tied output layer counted once
    untied = make("gpt", n_layer=1, n_head=2, n_embd=8, tie_embeddings=False)
    assert untied.num_params() == gpt.num_params() + V * 8


def test_lstm_option_and_bad_settings():
    assert isinstance(make("rnn", cell="lstm").rnn, torch.nn.LSTM)
    with pytest.raises(FournilError, match="unknown cell"):
        make("rnn", cell="transformer")
    with pytest.raises(FournilError, match="multiple of n_head"):
        make("gpt", n_embd=10, n_head=4)
    with pytest.raises(FournilError, match="has no setting"):
        build_model({"family": "mlp", "vocab_size": V, "block_size": T, "n_head": 2})
    with pytest.raises(FournilError, match="unknown model 'lstm'"):
        build_model({"family": "lstm"})
    with pytest.raises(FournilError, match='name no family: add "family", one of ngram'):  # (a KeyError before)
        build_model({"vocab_size": V, "block_size": T})


def test_llama_grouped_query_attention_and_sliding_window():
    full = make("llama", n_layer=1, n_head=4, n_kv_head=4, n_embd=16)
    grouped = make("llama", n_layer=1, n_head=4, n_kv_head=1, n_embd=16)
    assert full.num_params() - grouped.num_params() == 2 * 16 * (16 - 4)  # k and v shrink to one head
    windowed = make("llama", n_layer=1, sliding_window=3).eval()
    x = torch.randint(V, (1, T))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % V
    # position 2 still sees token 0; position 3 and later do not (one layer, a window of 3)
    assert not torch.allclose(windowed(x)[0, 2], windowed(y)[0, 2])
    assert torch.allclose(windowed(x)[0, 3:], windowed(y)[0, 3:], atol=1e-6)
    with pytest.raises(FournilError, match="multiple of n_kv_head"):
        make("llama", n_head=4, n_kv_head=3)


def test_a_cpu_trains_attention_over_short_rows_in_fp32_under_bf16_autocast():
    """Its bf16 backward pass took 2 to 12 times fp32's there (docs/training.md#precision); scoring without gradients,
    and rows of 512 tokens or more, stay in bf16, where bf16 is the faster."""
    import torch.nn.functional as F

    from fournil.models.base import BF16_ATTENTION_FROM, attend

    torch.manual_seed(0)
    for tokens in (16, BF16_ATTENTION_FROM):
        q, k, v = (torch.randn(2, 4, tokens, 16, requires_grad=True) for _ in range(3))
        in_fp32 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            in_bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            trained = attend(nn.Module(), q, k, v, causal=True)
            with torch.no_grad():
                scored = attend(nn.Module(), q, k, v, causal=True)
        assert torch.equal(trained, in_fp32 if tokens < BF16_ATTENTION_FROM else in_bf16)
        assert torch.equal(scored, in_bf16)
        trained.sum().backward()  # (and its gradients flow to the fp32 inputs)
        assert q.grad is not None and q.grad.dtype == torch.float32


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_fused_products_for_decoding_give_the_outputs_of_the_layers_quantized_apart(precision):
    """int8 and int4 decoding fuse a llama's q, k and v into one quantized product, and gate and up into another
    (one call and one quantization of their input each): the outputs, biases included, are those of the layers
    quantized one by one, and the layers' names go; Qwen3's norms on queries and keys apply to the fused product's."""
    from fournil.generate.quantize import Int4Linear, Int8Linear, quantize_layers

    torch.manual_seed(0)
    model = make("llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qkv_bias=True, mlp_bias=True,
                 qk_norm=True).eval()
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.data.uniform_(0.5, 1.5)  # (weights other than ones, as a trained model's)
    x = torch.randint(V, (3, T))
    apart = copy.deepcopy(model)
    for parent in list(apart.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, (Int4Linear if precision == "int4" and name != "lm_head" else Int8Linear)(child))
    quantize_layers(model, precision)
    names = {name for name, _ in model.named_buffers()}
    assert not {n for n in names if "gate_proj" in n or "up_proj" in n or "q_proj" in n}
    layer = "model.layers.1."
    assert {layer + "mlp.gate_up.weight", layer + "mlp.gate_up.bias", layer + "self_attn.qkv.bias"} <= names
    with torch.no_grad():
        assert torch.equal(model(x), apart(x))


def test_llama3_rope_scaling_slows_only_the_long_wavelengths():
    from fournil.models.llama import LlamaConfig, rope_frequencies

    plain = rope_frequencies(LlamaConfig(head_dim=64, rope_theta=500000.0))
    scaled = rope_frequencies(LlamaConfig(head_dim=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert torch.equal(scaled[:5], plain[:5])  # fast rotations untouched
    assert torch.allclose(scaled[-5:], plain[-5:] / 8)  # slow ones divided by the factor
    with pytest.raises(FournilError, match="not supported"):
        rope_frequencies(LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_rotary_frequencies_stay_in_fp32_when_the_model_is_cast():
    """Rounded to bf16 with the weights, the frequencies would turn every angle by a little more at each position."""
    from fournil.generate.quantize import quantize
    from fournil.models.llama import rope_frequencies

    model = make("llama", n_layer=1, rope_theta=500000.0)
    exact = rope_frequencies(model.config)
    assert not torch.equal(exact.bfloat16().float(), exact)  # (what a cast would lose)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: quantize(m, "int8")):
        model = cast(make("llama", n_layer=1, rope_theta=500000.0))
        assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, exact)
    assert next(model.parameters()).dtype == torch.bfloat16  # (the weights were cast)


@pytest.mark.parametrize("family", ["mlp", "rnn", "gpt", "llama", "seq2seq"])
def test_losses_from_chunks_of_positions_equal_those_of_whole_logits(family, monkeypatch):
    """The log-probabilities of targets (next-token, SFT, DPO) and distillation's KL, computed a few positions at a
    time with recomputation in the backward pass, against the same computed from every position's logits: values
    and gradients, in fp32."""
    import torch.nn.functional as F

    from fournil.data.batches import IGNORE
    from fournil.models import base
    from fournil.train.objectives import distillation_loss

    torch.manual_seed(0)
    model = make(family)
    source = (torch.randint(1, V, (4, 5)),) if family == "seq2seq" else ()
    x, y = torch.randint(V, (4, T)), torch.randint(V, (4, T))
    y[0, :4] = y[2, 6:] = IGNORE  # a prompt, padding: no target there
    teacher = torch.randn(4, T, V)

    def losses():
        model.zero_grad()
        logp = model(*source, x, targets=y)
        kd = distillation_loss(model(*source, x)[y >= 0], teacher[y >= 0], 2.0)
        (logp.sum() + kd).backward()
        return logp.detach(), kd.detach(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(base, "LOGITS_BUDGET", 5 * V)  # five positions a chunk; 29 with a target: six chunks
    logp, kd, grads = losses()
    model.zero_grad()
    logits = model(*source, x)
    whole = -F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none").view(y.shape)
    s, t = (F.log_softmax(v[y >= 0] / 2.0, -1) for v in (logits, teacher))
    whole_kd = (t.exp() * (t - s)).sum(-1).mean() * 4
    (whole.sum() + whole_kd).backward()
    assert torch.allclose(logp, whole, atol=1e-5) and (logp[y == IGNORE] == 0).all()
    assert kd.item() == pytest.approx(whole_kd.item(), abs=1e-5)
    for chunked, reference in zip(grads, (p.grad for p in model.parameters())):
        assert torch.allclose(chunked, reference, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_the_next_token_loss_under_bf16_autocast_equals_autograd_through_the_head(bias, monkeypatch):
    """The next-token loss's written-out gradient, in chunks under bf16 autocast (a CPU's training precision where
    it has bf16 units), against autograd through the same head under the same autocast: log-probabilities and
    gradients within bf16's rounding. Another kind of head computes the same log-probabilities, but refuses to be
    trained through."""
    from fournil.data.batches import IGNORE
    from fournil.models import base

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    targets = torch.randint(50, (3, 10))
    targets[0, :4] = targets[2, 7:] = IGNORE
    upstream = torch.randn(3, 10)  # a different weight for each position's log-probability

    def run(logprobs):
        head.zero_grad()
        hidden.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            logp = logprobs()
        (logp * upstream).sum().backward()
        return logp.detach(), [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]

    def traced():
        logits = head(hidden).float()
        return torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets >= 0)

    monkeypatch.setattr(base, "LOGITS_BUDGET", 7 * 50)  # chunks of 7 positions: 24 with a target, four chunks
    logp, grads = run(lambda: base.target_logprobs(head, hidden, targets))
    reference, reference_grads = run(traced)
    assert logp.dtype == torch.float32 and (logp[targets == IGNORE] == 0).all()
    bf16 = 2**-8  # bf16's relative rounding: a logit of size z is off by up to z x 2^-8, its log-probability too
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        largest = head(hidden).float().abs().max()
    torch.testing.assert_close(logp, reference, rtol=0, atol=2 * bf16 * largest)
    for name, chunked, expected in zip(["states", "weight", "bias"], grads, reference_grads):
        torch.testing.assert_close(chunked, expected, rtol=4 * bf16, atol=4 * bf16 * expected.abs().max(), msg=name)
    assert (grads[0][0, :4] == 0).all() and (grads[0][2, 7:] == 0).all()  # no target, no gradient

    wrapped = torch.nn.Sequential(head)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(base.target_logprobs(wrapped, hidden, targets), logp)
    with pytest.raises(FournilError, match="output layer of type Sequential"):
        base.target_logprobs(wrapped, hidden, targets)


@pytest.mark.parametrize("family, settings", [("gpt", {}), ("llama", {"n_kv_head": 2}),
                                              ("llama", {"n_kv_head": 2, "sliding_window": 4})])
def test_packed_rows_give_the_padded_rows_loss_and_gradients(family, settings):
    """Names packed several to a row, each attending only within itself with positions from its own start, score
    every target exactly as one name per padded row does: the training loss and its gradients are the same."""
    from fournil.config import DataConfig
    from fournil.data.batches import LineData, pack
    from fournil.data.corpus import load_splits
    from fournil.tokenizers import CharTokenizer
    from fournil.train.objectives import NextTokenPrediction

    names = load_splits(DataConfig("names"))[0].train
    tokenizer = CharTokenizer.train(names, boundary=True)
    x, y = LineData(names, tokenizer, "train").sample(64, torch.Generator().manual_seed(0))
    width = max(map(len, names)) + 1
    px, sees, py, _ = pack(x, y, width)
    assert px.shape[1] == width and len(px) < len(x) / 1.5  # names of about 6 letters: two or more to a row
    assert sorted(py[py != -1].tolist()) == sorted(y[y != -1].tolist())  # every target once, none added
    first = (sees.sum(-1) == 1) & (py != -1)  # a document's first token sees only itself
    assert int(first.sum()) == 64 and (sees <= torch.ones_like(sees).tril()).all()  # each its own, none sees ahead
    torch.manual_seed(0)
    model = build_model({"family": family, "vocab_size": tokenizer.vocab_size, "block_size": width, "n_layer": 2,
                         "n_head": 4, "n_embd": 32, **settings})
    results = []
    for pack_to in (None, width):
        model.zero_grad()
        loss, metrics = NextTokenPrediction(pack_to).loss(model, (x, y))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], metrics["tokens"]))
    (padded, padded_grads, n), (packed, packed_grads, m) = results
    assert n == m == int((y != -1).sum())
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_examples_packed_with_their_system_prompt_read_once_give_the_padded_rows_loss_and_gradients(family):
    """Fine-tuning's batches: examples that start with the same system prompt, packed into rows that hold it once
    (every example there sees it, and counts its positions as in a row of its own), score every answer token as the
    padded rows do; and a student distilled on them, reading them packed with its teacher, learns as from the padded
    rows."""
    from fournil.data.batches import IGNORE, pack
    from fournil.train.objectives import Distillation, NextTokenPrediction

    torch.manual_seed(0)
    system = torch.randint(1, 30, (5,))
    shapes = [(3, 2), (1, 8), (6, 1), (2, 5), (4, 4), (5, 7)]  # question and answer lengths
    T = max(5 + q + a for q, a in shapes) - 1
    x, y = torch.zeros(len(shapes), T, dtype=torch.long), torch.full((len(shapes), T), IGNORE)
    for i, (q, a) in enumerate(shapes):
        seq = torch.cat([system, torch.randint(1, 30, (q + a,))])
        x[i, : len(seq) - 1], y[i, 5 + q - 1 : len(seq) - 1] = seq[:-1], seq[5 + q :]
    width = 24
    px, sees, py, _ = pack(x, y, width, share=True)
    assert (px[:, :5] == system).all() and sees[:, 5:, :5][py[:, 5:] != IGNORE].all()  # once a row, seen by all
    assert len(px) == 3 and sorted(py[py != IGNORE].tolist()) == sorted(y[y != IGNORE].tolist())  # 3 rows, not 6
    model, teacher = (build_model({"family": family, "vocab_size": 30, "block_size": width, "n_layer": layers,
                                   "n_head": 4, "n_embd": 32}) for layers in (2, 3))
    for objective in (NextTokenPrediction, functools.partial(Distillation, teacher, 2.0, 0.5)):
        results = []
        for packing in ({}, {"pack_to": width, "share": True}):
            model.zero_grad()
            loss, metrics = objective(**packing).loss(model, (x, y))
            loss.backward()
            results.append(([loss.detach(), *(v for k, v in metrics.items() if k != "tokens")],
                            [p.grad.clone() for p in model.parameters()]))
        (padded, padded_grads), (packed, packed_grads) = results
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)  # the loss, and distillation's kd and nll
        for a, b in zip(packed_grads, padded_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_evaluation_packs_short_documents_and_scores_them_as_padded_rows(family):
    from fournil.config import DataConfig
    from fournil.data.batches import LineData
    from fournil.data.corpus import load_splits
    from fournil.evaluate import evaluate_nll
    from fournil.tokenizers import CharTokenizer

    names = load_splits(DataConfig("names"))[0].val[:300]
    tokenizer = CharTokenizer.train(names, boundary=True)
    data = LineData(names, tokenizer, "val")
    torch.manual_seed(0)
    model = build_model({"family": family, "vocab_size": tokenizer.vocab_size, "block_size": 64, "n_layer": 2,
                         "n_head": 4, "n_embd": 32})
    packed = evaluate_nll(model, data, tokenizer)
    model.packs = False  # (this instance only: one padded row per name)
    padded = evaluate_nll(model, data, tokenizer)
    assert packed["tokens"] == padded["tokens"] == data.num_targets
    assert packed["nll"] == pytest.approx(padded["nll"], rel=1e-6) and packed["bpb"] == pytest.approx(padded["bpb"], rel=1e-6)


def test_dropout_in_the_kernel_drops_the_share_asked_independently_and_its_gradient_through_the_same_mask():
    """fournil's dropout (a hash of a seed and each element's index): the share dropped is p within the binomial's
    spread, neighbours are dropped independently, the kept elements are scaled so the expectation is unchanged, the
    seed follows ``torch.manual_seed``, a bf16 input gets the fp32 input's mask, and the gradient goes through the
    same mask; a checkpointed LoRA layer recomputes the same masks (its gradients equal those kept)."""
    from fournil import kernels
    from fournil.config import LoraConfig
    from fournil.models.base import Dropout
    from fournil.models.lora import add_lora

    if not kernels.built():
        pytest.skip("fournil's kernels are not built on this machine (no C++ compiler, or not an x86 CPU)")
    p, n = 0.1, 1 << 20
    dropout = Dropout(p)
    x = torch.rand(n) + 1.0  # no zeros of its own
    torch.manual_seed(0)
    y = dropout(x)
    kept = y != 0
    q = round(p * 65536) / 65536  # p as the kernel rounds it
    spread = (q * (1 - q) / n) ** 0.5
    assert abs((1 - kept.float().mean().item()) - q) < 5 * spread
    both = (~kept[0::2] & ~kept[1::2]).float().mean().item()  # the two halves of one hash, dropped together
    assert abs(both - q * q) < 5 * (q * q / (n / 2)) ** 0.5
    assert torch.equal(y[kept], x[kept] * (1 / (1 - q)))
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)
    assert not torch.equal(dropout(x) != 0, kept)  # the generator moved on: another mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x.bfloat16()) != 0, kept)

    x.requires_grad_(True)
    torch.manual_seed(1)
    y = dropout(x)
    grad = torch.randn(n)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(y != 0, grad * (1 / (1 - q)), 0))
    dropout.eval()
    assert dropout(x) is x

    model = build_model({"family": "llama", "vocab_size": V, "block_size": T, "n_layer": 2, "n_head": 2, "n_embd": 32})
    add_lora(model, LoraConfig(dropout=0.5))
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight)  # the LoRA path counts from the start
    idx = torch.randint(V, (2, T))
    grads = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        model.train().zero_grad()
        torch.manual_seed(2)
        model(idx, targets=idx).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))
