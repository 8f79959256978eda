"""`fournil bench`: lm-evaluation-harness with fournil's engine, against lm-eval's own `hf` backend on the same weights,
and lm-eval's `local-completions` client, with its default settings, against `fournil serve`."""
import json
import math
import re
from pathlib import Path

import pytest
from conftest import CLI, Server, write_jsonl

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager

from fournil.evaluate.bench import write_tasks
from fournil.evaluate.harness import FournilLM
from fournil.runs import Run


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return TaskManager(include_path=str(write_tasks(tmp_path_factory.mktemp("tasks"))), include_defaults=False)


@pytest.fixture(scope="module")
def hf_folder(bpe_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "chat-hf"
    CLI(out.parent)("convert", bpe_llama, out)
    return out


def responses(results: dict, task: str) -> list:
    """Each document's raw answers (per choice for multiple choice), in document order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def evaluate(model, tasks, names, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=tasks, log_samples=True, bootstrap_iters=0,
                                   **kwargs)


def test_the_same_scores_and_answers_as_lm_evals_own_backend(bpe_llama, hf_folder, tasks):
    from lm_eval.models.huggingface import HFLM

    ours = FournilLM(model=str(bpe_llama), dtype="float32", batch_tokens=2048)
    theirs = HFLM(pretrained=str(hf_folder), dtype="float32", device="cpu", batch_size=1)
    a = evaluate(ours, tasks, ["fournil_hellaswag"], limit=200)
    b = evaluate(theirs, tasks, ["fournil_hellaswag"], limit=200)
    mine, reference = responses(a, "fournil_hellaswag"), responses(b, "fournil_hellaswag")
    assert len(mine) == len(reference) == 200
    gaps = [abs(float(x[0][0]) - float(y[0][0])) for m, r in zip(mine, reference) for x, y in zip(m, r)]
    assert len(gaps) == 800 and max(gaps) < 1e-3, max(gaps)  # 200 rows x 4 endings, each within 1e-3 nats
    for metric in ("acc,none", "acc_norm,none"):
        assert a["results"]["fournil_hellaswag"][metric] == b["results"]["fournil_hellaswag"][metric]

    kwargs = {"limit": 20, "num_fewshot": 0, "gen_kwargs": "max_gen_toks=24"}
    a, b = evaluate(ours, tasks, ["fournil_gsm8k"], **kwargs), evaluate(theirs, tasks, ["fournil_gsm8k"], **kwargs)
    assert responses(a, "fournil_gsm8k") == responses(b, "fournil_gsm8k")  # the same greedy answers, to the letter


def test_in_bf16_like_lm_evals_own_backend_in_bf16(bpe_llama, hf_folder, tasks):
    """``dtype=bfloat16`` casts the weights once, as the hf backend's ``dtype=bfloat16`` does: like with like, the
    scores agree to bf16's rounding (2^-8 relative at each step, a few steps of it over a whole continuation)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    ours = FournilLM(model=str(bpe_llama), dtype="bfloat16")
    theirs = HFLM(pretrained=str(hf_folder), dtype="bfloat16", device="cpu", batch_size=1)
    assert {p.dtype for p in ours.net.parameters()} == {torch.bfloat16}
    a = evaluate(ours, tasks, ["fournil_hellaswag"], limit=20)
    b = evaluate(theirs, tasks, ["fournil_hellaswag"], limit=20)
    pairs = [(float(x[0][0]), float(y[0][0])) for m, r in zip(responses(a, "fournil_hellaswag"),
                                                               responses(b, "fournil_hellaswag")) for x, y in zip(m, r)]
    assert len(pairs) == 80
    gaps = [abs(x - y) / max(1.0, abs(y)) for x, y in pairs]
    assert max(gaps) < 4 * 2**-8, max(gaps)


def test_gsm8k_for_chat_models_asks_in_the_chat_template(bpe_llama, tasks):
    results = evaluate(FournilLM(model=str(bpe_llama), dtype="float32"), tasks, ["fournil_gsm8k_chat"], limit=2,
                       apply_chat_template=True, gen_kwargs="max_gen_toks=4")
    for sample in results["samples"]["fournil_gsm8k_chat"]:
        prompt = sample["arguments"][0][0]
        assert prompt.startswith("<|im_start|>user\nSolve this problem step by step") and \
            prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert isinstance(sample["resps"][0][0], str)
    assert "exact_match,flexible-extract" in results["results"]["fournil_gsm8k_chat"]


def test_lm_evals_completions_client_with_its_defaults_against_the_server(bpe_llama, tasks):
    """lm-eval's default sends token ids (from the server's /tokenize, without a BOS token: lm-eval's API clients
    never add one) and asks for echoed log-probabilities: the same tokens get the same scores as in fournil bench."""
    server = Server(bpe_llama)
    try:
        client = evaluate("local-completions", tasks, ["fournil_hellaswag"], limit=5,
                          model_args=f"base_url={server.url}/v1/completions,model=chat,num_concurrent=1")
        status, ids = server.post("/tokenize", {"prompt": "To be, or not", "add_special_tokens": False})  # (lm-eval's)
        assert status == 200 and server.post("/detokenize", {"tokens": ids["tokens"]})[1]["prompt"] == "To be, or not"
        status, scored = server.post("/v1/completions", {"prompt": [ids["tokens"]], "max_tokens": 0, "echo": True,
                                                         "logprobs": 2})
        lp = scored["choices"][0]["logprobs"]
        assert status == 200 and scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["text"] == "To be, or not"
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids["tokens"])
        assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
        status, refused = server.post("/v1/completions", {"prompt": [5, 99999]})
        assert status == 400 and "prompt token 99999 is outside this model's vocabulary" in refused["error"]["message"]
        status, refused = server.post("/detokenize", {"tokens": [5, 99999]})
        assert status == 400 and refused["error"]["param"] == "tokens" and refused["error"]["message"].startswith(
            "tokens token 99999 is outside")
        assert server.post("/detokenize", {"tokens": []}) == (200, {"prompt": ""})
    finally:
        server.stop()
    direct = evaluate(FournilLM(model=str(bpe_llama), dtype="float32", add_bos_token=False), tasks,
                      ["fournil_hellaswag"], limit=5)
    for m, r in zip(responses(client, "fournil_hellaswag"), responses(direct, "fournil_hellaswag")):
        # fp32 on both sides, summed in other orders (one request a row, or rows packed): within 1e-3 nats, not
        # rounded to 3 decimals (-90.6135 and -90.6134 round apart; so they did on a CPU with only AVX2)
        assert [float(x[0][0]) for x in m] == pytest.approx([float(y[0][0]) for y in r], abs=1e-3)


def test_bench_prints_the_table_and_writes_a_report_card(cli, bpe_llama, tmp_path):
    result = cli("bench", bpe_llama, "--tasks", "hellaswag,bpb", "--limit", "8", "--dtype", "float32", "--out",
                 tmp_path / "card")
    assert "| fournil_hellaswag | none | acc |" in result.stdout
    bpb = float(next(line for line in result.stdout.splitlines() if "bits_per_byte" in line).split("|")[4])
    assert 0 < bpb < 8  # better than uniform over bytes
    results = json.loads((tmp_path / "card" / "results.json").read_text())
    assert results["git_hash"].startswith("fournil ") and "fatal" not in result.stderr  # (not git's complaint)
    for noise in ("scoring:", "Generating test split", "is defined, but"):  # a log gets no bars, nor lm-eval's
        assert noise not in result.stderr, noise  # warnings about a metric of ours left to its defaults
    assert math.isclose(results["results"]["fournil_bpb_shakespeare"]["bits_per_byte,none"], bpb, abs_tol=1e-4)
    bpb_rows = results["n-samples"]["fournil_bpb_shakespeare"]["effective"]
    card = (tmp_path / "card" / "report.md").read_text()
    assert "fournil_hellaswag" in card and "pretrained here; llama" in card and re.search(r"- test: nll \d\.\d{4}", card)

    # a second bench into the same folder keeps the tasks it does not run (it wrote over them) and replaces the others
    assert "| fournil_hellaswag | none | acc |" in cli("bench", bpe_llama, "--tasks", "hellaswag", "--limit", "4",
                                                       "--out", tmp_path / "card").stdout
    results = json.loads((tmp_path / "card" / "results.json").read_text())
    assert {t: n["effective"] for t, n in results["n-samples"].items()} == {"fournil_hellaswag": 4,
                                                                            "fournil_bpb_shakespeare": bpb_rows}
    assert math.isclose(results["results"]["fournil_bpb_shakespeare"]["bits_per_byte,none"], bpb, abs_tol=1e-4)
    assert re.search(rf"\| fournil_bpb_shakespeare \| none \| bits_per_byte \| [\d.]+ \| {bpb_rows} \|",
                     (tmp_path / "card" / "report.md").read_text())
    other = cli("bench", tmp_path / "elsewhere", "--out", tmp_path / "card", check=False)
    assert other.returncode == 2 and f"card holds the results of {Path(bpe_llama).resolve()}, not " in other.stderr
    (tmp_path / "card" / "results.json").write_text('{"results": ', encoding="utf-8")  # (a JSON traceback before)
    damaged = cli("bench", bpe_llama, "--out", tmp_path / "card", check=False)
    assert damaged.returncode == 2 and "results.json is damaged (" in damaged.stderr and "Traceback" not in damaged.stderr


def test_a_report_card_scores_a_run_on_as_many_tokens_as_its_training_validated_on(cli, bpe_llama, tmp_path):
    """A tuned run's own figures, on its validation's share of each split (GSM8K's whole splits took 5 of the 5.5
    minutes of a bench of 10 questions); `fournil eval` scores every token."""
    rows = [{"instruction": f"Say {i}", "output": "king queen lord night " * (4 + i % 9)} for i in range(400)]
    cli("finetune", bpe_llama, "--data", write_jsonl(tmp_path / "say.jsonl", rows), "--steps", "1", "--eval-tokens",
        "300", "--quiet", "--out", tmp_path / "tuned")
    cli("bench", tmp_path / "tuned", "--tasks", "hellaswag", "--limit", "2", "--out", tmp_path / "card")
    card = (tmp_path / "card" / "report.md").read_text()
    run = Run.load(tmp_path / "tuned", "cpu")
    part, whole = run.evaluate(max_tokens=300)["test"], run.evaluate()["test"]
    assert f"- test: nll {part['nll']:.4f}, " in card and f" ({part['tokens']:,} tokens)\n" in card
    assert part["tokens"] < whole["tokens"] / 2 and f"(at most about 300 tokens of each split, as its training " \
                                                 f"validated; `fournil eval {run.path}` scores them all)" in card


@pytest.mark.parametrize("args, message", [
    (("--tasks", "mmlu"), "unknown task 'mmlu': bundled ones are hellaswag, gsm8k, gsm8k_chat, bpb"),
    (("--limit", "0"), "--limit must be at least 1"),
    (("--include-path", "nowhere"), "--include-path nowhere: no such folder"),
])
def test_bench_refuses_in_one_line(cli, bpe_llama, args, message):
    result = cli("bench", bpe_llama, *args, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_bits_per_byte_of_a_model_without_an_end_of_text_token_is_refused_with_what_measures_it(cli, running_text):
    result = cli("bench", running_text, "--tasks", "bpb", "--limit", "1", check=False)
    assert result.returncode == 2 and "has no end-of-text token to put before a text it scores" in result.stderr
    assert f"`fournil eval {running_text}` gives its bits per byte on its own held-out text" in result.stderr


def test_a_task_file_of_ones_own_that_is_wrong_says_where(cli, bpe_llama, tmp_path):
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\n  bad: [indent\n")
    result = cli("bench", bpe_llama, "--include-path", tmp_path, "--tasks", "mine", check=False)
    assert result.returncode == 2 and f"{tmp_path / 'mine.yaml'} does not parse as YAML" in result.stderr
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\noutput_type: guess\n")
    result = cli("bench", bpe_llama, "--include-path", tmp_path, "--tasks", "mine", check=False)
    assert result.returncode == 2 and "a task of mine is not valid: Got invalid output_type 'guess'" in result.stderr


def test_choices_packed_after_their_shared_context_score_as_if_each_were_read_alone(running_text):
    """A context of 7 characters and 4 continuations of 3 to 6 (more than the model's 16 characters in all, so the
    choices go in more than one row), one context too long for the model, cut as lm-eval cuts it, and continuations
    longer than the context (an IndexError before), scored in parts of 8, each after the characters before it that
    fill the context."""
    import torch

    lm = FournilLM(model=str(running_text), dtype="float32", batch_tokens=40)
    enc = lm.tok_encode
    requests = [(("", ""), enc("To be, "), enc(c)) for c in ("or not", "and", "or bee", "to do")]
    requests.append((("", ""), enc("Now is the winter of our"), enc(" discontent")))
    requests += [(("", ""), enc("Now"), enc(" is the winter of our discontent" * n)) for n in (1, 2)]
    scores = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (logprob, greedy) in zip(requests, scores):
        whole, picked, chosen = context + continuation, 0.0, True
        size = 8 if len(continuation) > 16 else len(continuation)
        for start in range(len(context), len(whole), size):
            end = min(start + size, len(whole))
            inp = whole[max(0, end - 17):end - 1]  # the 16 tokens before the part's last one
            with torch.no_grad():
                alone = lm.net(torch.tensor([inp])).log_softmax(-1)[0, start - end:]
            part = torch.tensor(whole[start:end])
            picked += alone.gather(-1, part[:, None]).sum().item()
            chosen &= bool((alone.argmax(-1) == part).all())
        assert abs(picked - logprob) < 1e-4 * len(continuation) ** 0.5
        assert greedy == chosen


@pytest.mark.parametrize("new", [8, 16, 40])
def test_an_answer_as_long_as_the_context_is_generated_after_the_last_half_of_the_prompt(running_text, new):
    """lm-eval asks for answers of ``max_gen_toks`` tokens whatever the model's context (16 here): the prompt keeps
    the tokens that leave room for the answer, at least half a context (the whole prompt before, refused as too long
    for the context, at 16; a negative share of it at 40)."""
    from types import SimpleNamespace

    from fournil.generate import SamplingParams, complete

    lm = FournilLM(model=str(running_text), dtype="float32")
    text = "To be, or not to be, that is the question"
    answers = lm.generate_until([SimpleNamespace(args=(text, {"until": [], "max_gen_toks": new}))])
    prompt = lm.tok_encode(text)[-max(16 - new, 8):]
    alone = complete(lm.net, lm.tok, [prompt], SamplingParams(max_new_tokens=new, temperature=0, seed=1234))[0]
    assert answers == [alone.text] and len(alone.tokens) == new


@pytest.mark.parametrize("model, task, message", [
    ("rnn", "hellaswag", "benchmarks read with a Transformer decoder (gpt, llama, a pretrained model); "),
    ("gpt", "hellaswag", "cannot read this task's text: "),
    ("gpt", "gsm8k_chat", "this model has no chat template (it is not a chat model), and the _chat tasks ask their "
                          "questions in a chat: bench a chat model, or this one on the tasks without _chat (gsm8k)"),
    # (an AttributeError from lm-eval's request building before)
])
def test_a_model_that_cannot_be_benchmarked_is_refused_in_one_line(cli, trained, model, task, message):
    result = cli("bench", trained[model], "--tasks", task, "--limit", "2", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    if model == "rnn":  # refused before the benchmark's data is read
        assert "examples/s" not in result.stderr
