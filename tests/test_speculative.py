"""Speculative decoding: a draft proposes, the target checks; the text is the target's own."""
import copy
import math

import pytest
import torch
from conftest import free_port

from fournil.generate import SamplingParams, complete
from fournil.generate.engine import speculate
from fournil.generate.speculative import Speculation
from fournil.errors import FournilError
from fournil.models import build_model
from fournil.runs import Run
from fournil.tokenizers import CharTokenizer
from fournil.train.distill import teacher_layers


@pytest.fixture(scope="module")
def target_and_draft(bpe_llama):
    """The small chat model in fp32, and a draft of its first... and last layer (the layers:1 student)."""
    run = Run.load(bpe_llama, "cpu", "float32")
    settings, weights = teacher_layers(run.model, 1)
    draft = build_model(settings)
    draft.load_state_dict(weights)
    return run, draft.eval()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tokens_are_the_targets_own(target_and_draft, k):
    run, draft = target_and_draft
    tok = run.tokenizer
    params = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
    for text in ("To be, or not", "ROMEO:\nWhat light", "The king"):
        prompt = tok.encode(text)
        alone = complete(run.model, tok, [prompt], params, torch.float32)[0].tokens
        stats = Speculation()
        drafted = [p.token for p in speculate(run.model, draft, tok, prompt, params, torch.float32, k, stats)]
        assert drafted == alone and stats.tokens == 48 and stats.passes < 48


def test_a_draft_that_is_the_target_has_every_token_kept(target_and_draft):
    run, _ = target_and_draft
    stats = Speculation()
    params = SamplingParams(max_new_tokens=41, temperature=0.9, seed=3, ignore_eos=True)
    list(speculate(run.model, copy.deepcopy(run.model), run.tokenizer, run.tokenizer.encode("To be"), params,
                   torch.float32, 4, stats))
    assert (stats.passes, stats.tokens) == (9, 41)  # 8 passes of 4 drafted + 1, then the last token alone


def constant(logits: list[float], block: int = 256):
    """A llama whose next-token distribution is softmax(``logits``), whatever the context: every layer's output
    projections are zero (the residual stream stays the embedding), every token's embedding is the same vector, and
    the output layer maps it to ``logits``."""
    model = build_model({"family": "llama", "vocab_size": len(logits), "block_size": block, "n_layer": 1, "n_head": 2,
                         "n_kv_head": 1, "n_embd": 4, "tie_embeddings": False})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight[:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # RMS-normed: (2, 0, 0, 0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.tensor(logits) / 2
    return model.eval()


def test_sampled_tokens_follow_the_targets_distribution_and_the_acceptance_rule():
    """Target p and draft q known: every token drawn through the accept/reject rule follows p, and a target pass
    yields the expected (1 - a^(k+1)) / (1 - a) tokens, where a = sum(min(p, q)) is the chance a draft token is kept."""
    p_logits, q_logits = [2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 1.5, 1.0, 0.0, -2.0]
    target, draft = constant(p_logits), constant(q_logits)
    p, q = torch.tensor(p_logits).softmax(-1), torch.tensor(q_logits).softmax(-1)
    tok = CharTokenizer(list("abcde"))
    k, counts, stats = 3, torch.zeros(5), Speculation()
    for seed in range(60):
        params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed, ignore_eos=True)
        for piece in speculate(target, draft, tok, [0], params, torch.float32, k, stats):
            counts[piece.token] += 1
    n = counts.sum()
    assert n == 12_000
    assert (counts / n - p).abs().max() < 4 * math.sqrt(0.25 / n)  # 4 standard errors at most
    a = float(torch.minimum(p, q).sum())
    assert abs(stats.tokens_per_pass - (1 - a ** (k + 1)) / (1 - a)) < 0.05
    assert (counts / n - q).abs().max() > 0.1  # the draft's own distribution is far from what came out


@pytest.mark.parametrize("args, message", [
    (("--draft-tokens", "0"), "--draft-tokens must be at least 1"),
    (("--repetition-penalty", "1.2"), "penalties change the distribution as the answer grows: not with a draft"),
])
def test_draft_settings_refused_in_one_line(cli, bpe_llama, args, message):
    result = cli("generate", bpe_llama, "Hi", "--draft", bpe_llama, *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_draft_of_another_tokenizer_is_refused(cli, bpe_llama, trained):
    result = cli("generate", bpe_llama, "Hi", "--draft", trained["llama"], check=False)
    assert result.returncode == 2 and "the draft's tokenizer" in result.stderr and "Traceback" not in result.stderr
    result = cli("generate", trained["gpt"], "--draft", trained["rnn"], check=False)  # (its int8 weights were refused)
    assert result.stderr == ("fournil: error: speculative decoding needs Transformer decoders (gpt, llama, a "
                             "pretrained model) as target and draft\n")


def test_generate_with_a_draft_writes_the_models_own_greedy_text(cli, bpe_llama):
    args = ("To be, or not", "--max-new-tokens", "24", "--temperature", "0", "--dtype", "float32")
    alone = cli("generate", bpe_llama, *args).stdout
    drafted = cli("generate", bpe_llama, *args, "--draft", bpe_llama, "--draft-tokens", "3")
    assert drafted.stdout == alone and "tokens per pass of the model" in drafted.stderr


def test_a_draft_proposes_in_int8_on_a_cpu_beside_a_model_in_fp32(bpe_llama):
    """A draft's precision changes the speed, never the text: by default a CPU holds its weights in int8, its fastest
    there, and it computes in bf16 (its cache too) while the model it drafts for computes in fp32."""
    from fournil.generate.answerers import load_local

    run, draft = load_local(str(bpe_llama), "cpu", "auto", str(bpe_llama))
    assert (run.quantized, run.dtype, draft.quantized, draft.dtype) == (None, torch.float32, "int8", torch.bfloat16)
    assert load_local(str(bpe_llama), "cpu", "float32", str(bpe_llama))[1].quantized is None  # --dtype: for both
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    prompt, stats = run.tokenizer.encode("To be, or not"), Speculation()
    alone = complete(run.model, run.tokenizer, [prompt], params)[0].tokens
    drafted = [p.token for p in speculate(run.model, draft.model, run.tokenizer, prompt, params, run.dtype, 3, stats,
                                          draft.dtype)]
    assert drafted == alone and stats.passes < 40


def test_the_scheduler_drafts_for_a_sequence_alone_and_batches_the_others(target_and_draft):
    """With a draft, a sequence alone takes several tokens per pass of the model, and sequences together one token per
    pass each; greedy tokens are the model's own either way, also when a sequence is alone, then joined, then alone."""
    from fournil.generate import Scheduler

    run, draft = target_and_draft
    tok, model = run.tokenizer, run.model
    prompts = [tok.encode(t) for t in ("To be, or not", "ROMEO:\nWhat light", "The king")]
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    alone = [complete(model, tok, [p], params, torch.float32)[0].tokens for p in prompts]
    passes, forward = [0], model.forward

    def counted(*args, **kwargs):
        passes[0] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    try:
        s = Scheduler(model, tok, torch.float32, max_batch=4, draft=draft, draft_tokens=3)
        first = s.submit(prompts[0], params)
        while s.step():
            pass
        assert [p.token for p in first] == alone[0] and passes[0] < 40 / 2  # a prefill, then passes of up to 4 tokens

        requests = [s.submit(prompts[0], params)]
        for _ in range(5):  # alone for five steps, then two more join, and leave before it does
            s.step()
        requests += [s.submit(p, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)) for p in prompts[1:]]
        while s.step():
            pass
        assert [p.token for p in requests[0]] == alone[0]
        assert [[p.token for p in r] for r in requests[1:]] == [a[:10] for a in alone[1:]]
    finally:
        model.forward = forward


def test_a_conversation_with_a_draft_gets_the_models_own_greedy_answers_turn_after_turn(bpe_llama):
    """``fournil chat --draft``: the conversation's scheduler drafts (its last answer's keys and values kept for the
    next turn), and each answer is the model's own."""
    from fournil.generate.answerers import answerer

    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    answers = {}
    for draft in (None, bpe_llama):
        chat = answerer(str(bpe_llama), "cpu", "float32", draft=draft, conversation=True)
        messages = [{"role": "user", "content": "To be, or not"}]
        for question in ("ROMEO:", "The king"):
            messages += [{"role": "assistant", "content": "".join(chat.chat(messages, params))},
                         {"role": "user", "content": question}]
        answers[draft] = (messages, chat.turns.kept is not None, chat.speculation)
    (alone, kept, _), (drafted, kept_too, stats) = answers.values()
    assert drafted == alone and kept and kept_too
    assert stats.tokens == 40 and stats.passes <= 10  # the model itself as its draft: 4 proposals kept, and 1 more
    with pytest.raises(FournilError, match="penalties change the distribution"):
        list(chat.chat(messages, SamplingParams(max_new_tokens=4, repetition_penalty=1.2)))


def test_serve_with_a_draft_answers_with_the_models_own_greedy_text(bpe_llama):
    import openai
    from conftest import Server

    server = Server(bpe_llama, "--dtype", "float32")
    drafted = Server(bpe_llama, "--dtype", "float32", "--draft", bpe_llama, "--draft-tokens", "3")
    try:
        answers = []
        for s in (server, drafted):
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
            out = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "To be, or not"}],
                                                 max_tokens=30, temperature=0)
            answers.append(out.choices[0].message.content)
        assert answers[0] == answers[1] and answers[0]
    finally:
        server.stop()
        drafted.stop()


def test_serve_refuses_a_draft_it_cannot_use_in_one_line(cli, bpe_llama, trained):
    for args, message in [(("--draft", bpe_llama, "--draft-tokens", "0"), "--draft-tokens must be at least 1"),
                          (("--draft", trained["llama"]), "the draft's tokenizer")]:
        result = cli("serve", bpe_llama, *args, "--port", str(free_port()), check=False, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
