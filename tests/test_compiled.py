"""The compiled decoding step: the same tokens as eager decoding, compiled once for every step that follows."""
import os
import shutil
import threading
import time

import openai
import pytest
import torch
from conftest import Server

from fournil.errors import FournilError
from fournil.generate import SamplingParams, Scheduler, complete, score
from fournil.generate.compiled import compile_decoding, decoding_step
from fournil.runs import Run
from tests.test_engine import assert_greedy


@pytest.mark.parametrize("family,precision,graphs", [("gpt", "float32", False), ("llama", "float32", False),
                                                     ("llama", "int4", False), ("llama", "float32", True)])
def test_compiled_steps_give_eager_tokens_as_sequences_join_leave_and_the_cache_grows(trained, family, precision,
                                                                                     graphs):
    """int4: on a CPU with AVX2, its layers call fournil's own kernel, which the compiled step calls as it is.

    graphs: the step as it runs on a GPU to replay CUDA graphs; on a CPU Inductor records none, and what this checks
    is the rest: the cache's keys and values marked as staying in place, yet compiled once for any rows and size."""
    run = Run.load(trained[family], "cpu").quantize(precision)
    tok = run.tokenizer
    assert decoding_step(run.model) is None
    compile_decoding(run.model, run.dtype, max_batch=3, graphs=graphs)
    words = ["ma", "christ", "j", "ann", "el", "xavier"]
    budgets = [9, 3, 7, 5, 2, 6]
    prompts = [tok.prompt_ids(w) for w in words]
    # a narrow cache: it must grow and realign
    scheduler = Scheduler(run.model, tok, run.dtype, max_batch=3, first_columns=4)
    requests = [scheduler.submit(p, SamplingParams(max_new_tokens=n, temperature=0, logprobs=2, ignore_eos=True))
                for p, n in zip(prompts, budgets)]  # each takes its whole budget (see the eager test)
    rel = 1e-5 if precision == "float32" else 2**-5  # near ties: a few steps of fp32, or of int4's bf16 activations
    sizes = set()
    with torch.compiler.set_stance("fail_on_recompile"):  # compiled once for any number of rows and cache size
        while scheduler.step():
            sizes.add(len(scheduler.active))
    assert sizes >= {1, 2, 3}
    for r, p, n in zip(requests, prompts, budgets):
        pieces = [piece for piece in r if piece.token >= 0]
        tokens = [piece.token for piece in pieces]
        assert_greedy(run.model, tok, p, tokens, r.finish_reason, n, rel, ignore_eos=True)
        if precision == "float32":  # the step's scores minus its log-sum-exp: the model's log-probabilities
            assert [x.logprob for x in pieces] == pytest.approx(score(run.model, p + tokens, len(p)), abs=1e-5)
            assert all(x.top[x.token] == max(x.top.values()) == pytest.approx(x.logprob, abs=1e-6) for x in pieces)


def test_compiled_smollm2_writes_eager_greedy_tokens_on_the_parity_prompts():
    from tests.test_smollm2 import PROMPTS

    run = Run.load("smollm2", "cpu")
    prompts = [run.tokenizer.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    eager = [complete(run.model, run.tokenizer, [p], params)[0].tokens for p in prompts]
    compile_decoding(run.model, torch.float32)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = [complete(run.model, run.tokenizer, [p], params)[0].tokens for p in prompts]
    assert compiled == eager


def test_a_compiled_server_answers_while_its_step_compiles_then_with_the_step_the_engine_s_greedy_tokens(bpe_llama,
                                                                                                       tmp_path):
    """``serve --compile`` answers at once: another process compiles the step (none kept yet: an Inductor folder of
    its own) while the model answers as it is, and /metrics says when the step decodes. A restart has a thread load
    the step that the first launch kept (not compiled again), and then decodes with it."""
    run = Run.load(bpe_llama, "cpu")
    prompts = ["KING", "QUEEN", "To be or not", "ROMEO:"]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    alone = [complete(run.model, run.tokenizer, [run.tokenizer.prompt_ids(p)], params, torch.float32)[0].text
             for p in prompts]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    server = Server(bpe_llama, "--compile", "--dtype", "float32", env=env)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        answers = {}

        def ask(prompt):
            out = client.completions.create(model="chat", prompt=prompt, max_tokens=12, temperature=0)
            answers[prompt] = out.choices[0].text

        ask(prompts[1])
        assert answers[prompts[1]] == alone[1] and "fournil_compiled_decoding 0" in server.get("/metrics")[1]
        wait_for_the_step(server)
        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ask(prompts[0])  # and alone
        assert [answers[p] for p in prompts] == alone
    finally:
        server.stop()
    assert "(the decoding step is compiled, in" in server.output()
    kept = sorted(tmp_path.glob("fournil-steps/*.bin"))
    assert len(kept) == 2  # one row; several
    written = [f.stat().st_mtime_ns for f in kept]
    server = Server(bpe_llama, "--compile", "--dtype", "float32", env=env)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")  # (the one ``ask`` calls)
        wait_for_the_step(server)
        answers.clear()
        ask(prompts[2])
        assert answers[prompts[2]] == alone[2]
    finally:
        server.stop()
    said = server.output()
    assert "it loads in the background" in said and "(the decoding step is loaded, in" in said
    assert [f.stat().st_mtime_ns for f in kept] == written


def wait_for_the_step(server: Server) -> None:
    deadline = time.time() + 600
    while "fournil_compiled_decoding 1" not in server.get("/metrics")[1]:
        assert time.time() < deadline, "the step was not ready in 10 minutes"
        time.sleep(0.5)


def test_chat_answers_while_its_step_compiles_and_keeps_it_for_the_next_launch(cli, bpe_llama, tmp_path):
    """A chat's first launch answers at once, as the model is, while another process compiles its step; at the end
    of its input it waits for the step to be kept, and the next launch loads it. A folder where nothing can be kept
    stops that process at once, and the chat says why."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = ["chat", bpe_llama, "--max-new-tokens", "12", "--temperature", "0", "--dtype", "float32"]
    questions = "KING\nTo be or not\n"
    eager = cli(*args, input=questions).stdout
    first = cli(*args, "--compile", input=questions, env=env)
    assert first.stdout == eager and "it compiles in the background" in first.stderr
    assert "(the decoding step is still compiling: waiting to keep it for the next launch" in first.stderr
    (kept,) = (tmp_path / "inductor" / "fournil-steps").glob("*.bin")
    written = kept.stat().st_mtime_ns
    second = cli(*args, "--compile", input=questions, env=env)
    assert second.stdout == eager and "an earlier launch compiled it: it loads in the background" in second.stderr
    assert "still compiling" not in second.stderr and kept.stat().st_mtime_ns == written
    shutil.rmtree(kept.parent)
    kept.parent.write_text("")
    third = cli(*args, "--compile", input=questions, env=env)
    assert third.stdout == eager and "the decoding step could not be compiled in the background (FileExistsError" \
        in third.stderr and "Traceback" not in third.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "openai:m@http://127.0.0.1:9/v1", "--compile"], "--compile speeds up a model loaded here"),
    (["chat", "RUN", "--compile", "--draft", "RUN"], "--compile and --draft do not go together here"),
])
def test_compile_refuses_what_it_cannot_speed_up_before_loading(cli, bpe_llama, args, message):
    result = cli(*[str(bpe_llama) if a == "RUN" else a for a in args], check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_two_models_of_the_same_shapes_each_get_a_compiled_step_of_their_own(monkeypatch, tmp_path):
    """Without guards on the modules, one model's compiled step could run for another whose tensors have the same
    shapes: here the two differ only in a number the compiled code holds (the norms' epsilon).

    And the compiled code goes to fournil's folder for this CPU kind even where PyTorch has written its default folder
    into the environment, as it does once anything reads its cache (transformers' GGUF loader): there, code compiled
    with AVX512 and read under ``ATEN_CPU_CAPABILITY=avx2`` gave NaN scores."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fournil.models import build_model
    from fournil.tokenizers import CharTokenizer

    tok = CharTokenizer(list("abcdefghij"))
    sizes = {"family": "llama", "n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 16, "block_size": 32,
             "vocab_size": tok.vocab_size}
    torch.manual_seed(0)
    first = build_model(sizes).eval()
    for p in first.parameters():
        torch.nn.init.normal_(p)  # (a model of varied answers: the tiny initial weights answer one token throughout)
    second = build_model({**sizes, "rms_norm_eps": 10.0}).eval()
    second.load_state_dict(first.state_dict())
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompt = tok.encode("abc")
    eager = [complete(m, tok, [prompt], params)[0].tokens for m in (first, second)]
    assert eager[0] != eager[1]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for m in (first, second):
        compile_decoding(m, torch.float32)
    assert [complete(m, tok, [prompt], params)[0].tokens for m in (first, second)] == eager
    kind = torch.backends.cpu.get_cpu_capability().lower()
    folder = tmp_path / "fournil" / "inductor" / f"torch-{torch.__version__}-{kind}"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder) and any(folder.rglob("*.so"))
    assert len(list((folder / "fournil-steps").glob("*.bin"))) == 2  # each kept under a name of its own


def test_a_second_launch_loads_the_step_the_first_kept_and_compiles_again_a_file_it_cannot_trust(cli, trained,
                                                                                                 tmp_path):
    """On a CPU the compiled step is kept on disk: the next launch loads it (the file is left as it was) and
    answers as eager decoding does. A file that is not a step, or that others could have written, is compiled again
    and replaced; where nothing can be written, the launch says so and answers all the same."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = ["generate", trained["llama"], "ma", "--max-new-tokens", "12", "--temperature", "0", "--dtype", "float32"]
    eager = cli(*args).stdout

    def launch() -> str:
        result = cli(*args, "--compile", env=env)
        assert "compiled in" in result.stderr
        return result.stdout

    assert launch() == eager
    (kept,) = (tmp_path / "inductor" / "fournil-steps").glob("*.bin")
    written = kept.stat().st_mtime_ns
    assert launch() == eager and kept.stat().st_mtime_ns == written  # loaded, not compiled again
    kept.write_bytes(b"not a compiled step")
    assert launch() == eager and kept.read_bytes() != b"not a compiled step"
    kept.chmod(0o666)
    written = kept.stat().st_mtime_ns
    assert launch() == eager and kept.stat().st_mtime_ns != written and kept.stat().st_mode & 0o777 == 0o600
    env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # nothing kept, nothing loaded: compiled in the process
    written = kept.stat().st_mtime_ns
    assert launch() == eager and kept.stat().st_mtime_ns == written
    del env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"]
    shutil.rmtree(kept.parent)
    kept.parent.write_text("")  # a file where the folder goes: nothing can be kept, and the launch says so
    result = cli(*args, "--compile", env=env)
    assert result.stdout == eager and "the compiled decoding step could not be kept for the next launch" \
        in result.stderr and "Traceback" not in result.stderr


def test_chat_refuses_a_model_that_cannot_chat_before_compiling_it(cli, trained):
    result = cli("chat", trained["llama"], "--compile", input="hello\n", check=False)
    assert result.returncode == 2 and "this model has no chat template" in result.stderr
    assert "compiling" not in result.stderr and "Traceback" not in result.stderr


def test_compile_refuses_a_model_without_a_decoding_step(cli, trained):
    result = cli("generate", trained["ngram"], "--compile", check=False)
    assert result.stderr == "fournil: error: --compile compiles a Transformer's decoding step; the ngram model has " \
                            "none\n"  # (after it said it was compiling)


def test_compile_refuses_a_seq2seq_model_which_has_a_cache_but_no_decoding_step():
    """(``generate`` and ``serve`` compile before they look at the model: a TypeError from the cache before.)"""
    from fournil.models import build_model

    model = build_model({"family": "seq2seq", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32,
                         "vocab_size": 11})
    with pytest.raises(FournilError, match="--compile needs a decoder-only language model; a seq2seq model writes a "
                                           "target for a source: `fournil sample RUN --prompt SOURCE`"):
        compile_decoding(model, torch.float32)
