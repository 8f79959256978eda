"""The encoder-decoder Transformer: the nombres task, the model's attention, decoding, and training end to end."""
import collections
import itertools
import json
import random
import re
import shutil

import pytest
import torch
from conftest import CLI, InProcess, Server

from fournil.config import DataConfig
from fournil.data import load_splits
from fournil.data.instructions import BUNDLED_INSTRUCTIONS, data_path
from fournil.data.nombres import as_source, in_digits, in_words
from fournil.errors import FournilError
from fournil.evaluate.metrics import edit_distance, output_scores
from fournil.generate.seq2seq import beam_search, sample_targets
from fournil.generate.sampling import SamplingParams
from fournil.models import build_model

CHECKED = {  # written out by hand from the rules (Grevisse; "et" in 21-71, the s of vingts and cents)
    0: "zéro", 1: "un", 16: "seize", 17: "dix-sept", 21: "vingt et un", 22: "vingt-deux", 31: "trente et un",
    70: "soixante-dix", 71: "soixante et onze", 72: "soixante-douze", 79: "soixante-dix-neuf", 80: "quatre-vingts",
    81: "quatre-vingt-un", 88: "quatre-vingt-huit", 90: "quatre-vingt-dix", 91: "quatre-vingt-onze",
    99: "quatre-vingt-dix-neuf", 100: "cent", 101: "cent un", 180: "cent quatre-vingts", 200: "deux cents",
    201: "deux cent un", 280: "deux cent quatre-vingts", 1000: "mille", 1001: "mille un", 1080: "mille quatre-vingts",
    1234: "mille deux cent trente-quatre", 2000: "deux mille", 21000: "vingt et un mille", 80000: "quatre-vingt mille",
    80080: "quatre-vingt mille quatre-vingts", 71071: "soixante et onze mille soixante et onze",
    101101: "cent un mille cent un", 200000: "deux cent mille", 300200: "trois cent mille deux cents",
    999999: "neuf cent quatre-vingt-dix-neuf mille neuf cent quatre-vingt-dix-neuf",
}


def test_numbers_in_french_words_follow_the_rules():
    assert {n: in_words(n) for n in CHECKED} == CHECKED
    assert in_digits(1234) == "1 234" and in_digits(999999) == "999 999" and in_digits(7) == "7"
    with pytest.raises(ValueError):
        in_words(1_000_000)
    # what a person types, as the sources are written (the model read "1234" as "123": "cent vingt-trois")
    assert [as_source(s) for s in ("1234", "1 234", " 71080 ", "007", "0")] == ["1 234", "1 234", "71 080", "7", "0"]
    for wrong in ("1000000", "12a", "-5", "", "١٢"):  # (Arabic-Indic digits: isdigit, but not the data's)
        with pytest.raises(FournilError, match="is not a number from 0 to 999 999, which nombres writes in words"):
            as_source(wrong)


def test_nombres_splits_hold_disjoint_numbers():
    splits, _ = load_splits(DataConfig("nombres"))
    sources = [{s for s, _ in part} for _, part in splits.items()]
    assert splits.mode == "pairs" and list(map(len, sources)) == [36_000, 2_000, 2_000]
    assert len(sources[0] | sources[1] | sources[2]) == 40_000  # no number in two splits
    # the short numbers, rare, are practised: each of those below 100 comes 40 times in training, below 1,000 4 times
    times = collections.Counter(int(s.replace(" ", "")) for s, _ in splits.train)
    short = [n for n in times if n < 1000]
    assert {times[n] for n in short if n < 100} == {40} and {times[n] for n in short if n >= 100} == {4}
    assert set(times.values()) == {1, 4, 40} and len(splits.train) == 36_000 + 39 * sum(n < 100 for n in short) + 3 * \
        sum(n >= 100 for n in short)
    assert len(splits.val) == len(sources[1]) and len(splits.test) == len(sources[2])  # once each
    source, target = splits.test[0]
    assert in_words(int(source.replace(" ", ""))) == target


def tiny(**settings):
    torch.manual_seed(0)
    return build_model({"family": "seq2seq", "vocab_size": 5, "block_size": 5, "n_layer": 2, "n_head": 2, "n_embd": 16,
                        "bos_id": 0, "eos_id": 0, **settings}).eval()


def test_the_decoder_reads_only_earlier_targets_and_the_real_source_tokens():
    model = tiny()
    src, tgt = torch.tensor([[3, 4, 2]]), torch.tensor([[0, 1, 2, 3]])
    logits = model(src, tgt)
    changed = model(src, torch.tensor([[0, 1, 2, 4]]))
    assert torch.allclose(logits[:, :3], changed[:, :3], atol=1e-6) and not torch.allclose(logits[:, 3], changed[:, 3])
    padded = model(torch.tensor([[3, 4, 2, 0, 0]]), tgt)  # padding (the end token) is masked out of attention
    assert torch.allclose(logits, padded, atol=1e-5)
    assert not torch.allclose(logits, model(torch.tensor([[3, 4, 1]]), tgt))  # the source matters: cross-attention
    memory, mask = model.encode(src)
    cache = model.new_cache()
    stepwise = torch.cat([model.decode(tgt[:, t : t + 1], memory, mask, cache) for t in range(4)], 1)
    assert torch.allclose(stepwise, logits, atol=1e-5)  # decoding from the key/value cache is the same computation
    separate = tiny(shared_embeddings=False, tie_embeddings=False)
    assert separate.model.encoder.embed_tokens is not separate.model.decoder.embed_tokens
    assert separate.num_params() == model.num_params() + 2 * 5 * 16


def test_beam_search_finds_the_best_target_when_it_can_keep_every_hypothesis():
    model = tiny()
    sources = [[3, 4, 2], [1, 2]]
    limit = model.config.block_size - 1

    def best(source):  # every target: tokens 1-4 ended by 0, or cut at the limit; the best log-probability per token
        scored = []
        for n in range(limit + 1):
            for body in itertools.product(range(1, 5), repeat=n):
                ended = n < limit
                target = torch.tensor([[0, *body]])
                logprobs = model(torch.tensor([source]), target).log_softmax(-1)[0]
                total = sum(logprobs[t, tok] for t, tok in enumerate(body)) + (logprobs[n, 0] if ended else 0)
                scored.append((float(total) / (n + 1), list(body)))
        return max(scored)[1]

    with torch.no_grad():
        exhaustive = [best(s) for s in sources]
        assert beam_search(model, sources, width=4**limit) == exhaustive
        greedy = sample_targets(model, sources, SamplingParams(temperature=0))
        assert beam_search(model, sources, width=1) == greedy


def test_exact_match_and_character_error_rate():
    assert edit_distance("vingt et un", "vingt-et-un") == 2 and edit_distance("", "abc") == 3
    scores = output_scores(["cent", "deux cents", "mile"], ["cent", "deux cent", "mille"])
    assert scores["exact"] == pytest.approx(1 / 3) and scores["cer"] == pytest.approx(2 / 18)


def test_seq2seq_learns_to_reverse_words_and_reports_exact_match(tmp_path, capsys, monkeypatch):
    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcde") for _ in range(rng.randint(2, 5))) for _ in range(3000)})
    rng.shuffle(words)
    for name, part in {"train": words[:-100], "val": words[-100:-50], "test": words[-50:]}.items():
        (tmp_path / f"{name}.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in part), encoding="utf-8")
    cli = CLI(tmp_path)
    cli("train", "--model", "seq2seq", "--train", "train.tsv", "--val", "val.tsv", "--test", "test.tsv", "--n-layer", "2",
        "--n-embd", "64", "--steps", "300", "--lr", "3e-3", "--eval-every", "150", "--quiet", "--out", "rev")
    out = cli("eval", "rev").stdout
    test = re.search(r"^test +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +([\d.]+)% +([\d.]+)%$", out, re.M)
    assert float(test.group(1)) >= 90  # words never seen in training, reversed letter for letter
    assert float(test.group(2)) < 5
    assert cli("sample", "rev", "--prompt", "abcde", "--beam", "3").stdout.strip() == "edcba"
    shown = cli("sample", "rev", "-n", "5")
    assert len(shown.stdout.splitlines()) == 5 and re.search(r"^\d of 5 held-out sources right$", shown.stderr, re.M)
    refused = cli("sample", "rev", "--prompt", "abc", "--beam", "0", check=False)
    assert refused.returncode == 2 and "--beam 0: give a width of 1 (greedy) or more" in refused.stderr
    in_process = InProcess(capsys, monkeypatch, tmp_path)  # (no start-up for each)
    other = in_process("eval", "rev", "--data", "test.tsv").stdout  # pairs of one's own: as its test split scores
    assert re.search(r"^test.tsv +(\d.*)$", other, re.M).group(1) == test.group(0).removeprefix("test").strip()
    (tmp_path / "long.tsv").write_text("abcabcabc\tcba\n", encoding="utf-8")
    for data, message in (("names", "names: a seq2seq model scores (source, target) pairs: give a .tsv file"),
                          ("long.tsv", "long.tsv: a source or target of 9 tokens is longer than this model reads (6)")):
        refused = in_process("eval", "rev", "--data", data)  # (it said "scoring a text needs a decoder-only model")
        assert refused.returncode == 2 and refused.stderr.startswith(f"fournil: error: {message}"), refused.stderr
    drawn = in_process("sample", "rev", "--prompt", "abcde", "-n", "3", "--temperature", "2", "--seed", "0")
    assert len(drawn.stdout.splitlines()) == 3  # -n outputs for the source (it gave one)
    assert in_process("sample", "rev", "--prompt", "abcde", "--beam", "3", "--max-new-tokens", "2").stdout == "ed\n"
    for args, message in ((("--beam", "3", "--temperature", "0.7"), "--beam 3 searches for the most likely output, "
                                                                     "and --temperature is for drawing one"),
                          (("--beam", "3", "-n", "2"), "--beam 3 gives one output, the most likely: leave -n out"),
                          (("--num", "0"), "-n (--num) must be a whole number, at least 1 (got 0)")):
        refused = in_process("sample", "rev", "--prompt", "abc", *args)  # (they were ignored)
        assert refused.returncode == 2 and refused.stderr.startswith(f"fournil: error: {message}"), refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    for args, what in ((("distill", "--teacher", "rev"), "distillation"),  # (each a traceback, for a seq2seq model
                       (("finetune", "rev"), "tuning on instructions"),      # of a BPE, or a distilled student it
                       (("align", "rev"), "learning from preferences"),      # could build)
                       (("reward", "train", "rev"), "learning from preferences")):
        refused = in_process(*args, "--steps", "1")
        assert refused.stderr.startswith(f"fournil: error: {what} needs a decoder-only language model; a seq2seq "), \
            refused.stderr
    drawn = cli("embeddings", "rev", "--out", "e.png").stdout  # (it said a seq2seq model has no token embeddings)
    assert re.match(r"(\d+) of \1 token embeddings of width 64", drawn) and (tmp_path / "e.png").stat().st_size > 5000
    refused = cli("generate", "rev", "abc", check=False)
    assert refused.returncode == 2 and "fournil sample RUN --prompt SOURCE" in refused.stderr, refused.stderr
    served_by(Server(tmp_path / "rev"))
    exported_to_transformers(tmp_path, in_process)
    # which source letter each letter it writes reads: its mirror (the rows ran from 0.40 to 0.97, fp32 and bf16)
    from fournil.evaluate.attention import cross_attention_maps
    from fournil.runs import Run

    run = Run.load(tmp_path / "rev")
    source, written, weights = cross_attention_maps(run.model, run.tokenizer, "abcde")
    assert source == list("abcde") and written == list("edcba")  # (5 letters fill the context: no end is written)
    assert weights.shape == (2, 4, 5, 5) and torch.allclose(weights.sum(-1), torch.ones(2, 4, 5))
    assert weights[-1].mean(0).argmax(-1).tolist() == [4, 3, 2, 1, 0]
    said = cli("attention", "rev", "abc", "--token", "b", "--out", "a.png").stdout.splitlines()
    assert said[0] == "'abc' -> 'cba'; the decoder's cross-attention: which source tokens each token it writes reads"
    assert said[1] == "4 tokens, 2 layers x 4 heads; layer 1 -> a.png"  # c, b, a and the end
    assert said[2].startswith("'b' attends most to: 'b' ") and (tmp_path / "a.png").stat().st_size > 5000
    explained = run.explain("abc")  # how sure it was of each letter it wrote, and of its end
    assert [r["label"] for r in explained["rows"]] == [".c", "cb", "ba", "a."]
    cfg = run.model.config
    source, target = run.tokenizer.encode("abc"), [cfg.bos_id, *run.tokenizer.encode("cba"), cfg.eos_id]
    with torch.no_grad():
        logprobs = run.model(torch.tensor([source]), torch.tensor([target[:-1]]))[0].log_softmax(-1)
    assert [r["logprob"] for r in explained["rows"]] == pytest.approx(
        [logprobs[t, target[t + 1]].item() for t in range(4)], abs=1e-5)
    said = cli("explain", "rev", "abc", "--out", "e.png").stdout.splitlines()
    assert said[0] == "'abc' -> 'cba'" and said[1].startswith(".c ") and said[-1].startswith("NLL ")
    for source, message in (("", "the source '' has no token the model knows"),
                            ("abcdeabcde", "the source has 10 tokens; the model's context is 6: give a shorter one"),
                            ("xyz", "'x', 'y', 'z' are not in the model's vocabulary")):
        for command in ("explain", "attention"):
            refused = cli(command, "rev", source, check=False)
            assert refused.returncode == 2 and refused.stderr.startswith(f"fournil: error: {message}"), refused.stderr
            assert len(refused.stderr.splitlines()) == 1
    refused = cli("explain", "rev", "abc", "--question", "Reverse?", check=False)  # (no answer to a question here)
    assert refused.stderr.startswith("fournil: error: rev is a seq2seq model: it is explained on what it writes for a "
                                     "source, not on an answer to a question: leave --question out")
    first = words[-100]  # with no source given, the first held-out one
    said = cli("attention", "rev", "--out", "a.png").stderr
    assert said == f"(the first held-out source of rev: {first!r}; give a TEXT for another)\n"


def exported_to_transformers(tmp_path, in_process) -> None:
    """The word-reversing model as a Hugging Face folder (Blenderbot's architecture is fournil's): transformers
    computes the same logits, and reverses a batch of words, padded, as fournil does (export refused it); fournil
    reads the folder back."""
    import transformers

    from fournil.runs import Run

    assert in_process("convert", "rev", "hf").stdout == "wrote hf (hf)\n"
    refused = in_process("convert", "rev", "rev.gguf")
    assert refused.returncode == 2 and refused.stderr.startswith("fournil: error: a seq2seq model is exported as a "
                                                                 "Hugging Face folder"), refused.stderr
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    run, words = Run.load(tmp_path / "rev", "cpu"), ["abcd", "eb", "cab", "ddeea"]  # (the lengths it learned)
    source, target = torch.tensor([run.tokenizer.encode("abcd")]), torch.tensor([[0, *run.tokenizer.encode("dc")]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=source, decoder_input_ids=target).logits, run.model(source, target),
                              atol=1e-5)
        batch = tokenizer(words, return_tensors="pt", padding=True)
        written = tokenizer.batch_decode(model.generate(**batch, do_sample=False), skip_special_tokens=True)
    assert written == run.translate(words) and run.translate(words[0]) == written[0]  # (a text alone: each of its
    # characters was a source)
    assert sum(w == s[::-1] for w, s in zip(written, words)) >= 3
    back = Run.load(tmp_path / "hf", "cpu")  # and read back, fournil's own again: the same logits and targets
    with torch.no_grad():
        assert torch.equal(back.model(source, target), run.model(source, target))
    assert back.mode == "pairs" and back.translate(words) == written
    refused = in_process("sample", "hf")
    assert refused.stderr.endswith("fournil: error: hf was imported, not trained here: it has no held-out sources of "
                                   "its own; give one with --prompt SOURCE\n")  # (after transformers' loading bar)


def served_by(server: Server) -> None:
    """``fournil serve`` of the word-reversing model (it used to refuse a seq2seq model): ``/predict`` and the page
    write the target of a source; the OpenAI API, which continues texts and conversations, is refused."""
    from playwright.sync_api import sync_playwright

    try:
        assert 'POST /predict {"text": SOURCE}' in server.printed
        assert server.post("/predict", {"text": "abc"}) == (200, {"text": "cba", "finish_reason": "stop"})
        assert server.post("/predict", {"text": "abc", "max_tokens": 2}) == (200, {"text": "cb", "finish_reason":
                                                                                    "length"})
        for path, body, message in (
                ("/predict", {"text": "abc", "max_tokens": 6}, "max_tokens is 6; this model writes targets of at most "
                                                               "5 tokens: lower it"),
                ("/predict", {"text": "abcdeabcde"}, "the source has 10 tokens; the model's context is 6"),
                ("/predict", {"text": "xyz"}, "'x', 'y', 'z' are not in the model's vocabulary"),
                ("/v1/completions", {"model": "rev", "prompt": "abc"},
                 'rev is a seq2seq model: it writes a target for a source, which POST /predict {"text": SOURCE}'),
                ("/v1/chat/completions", {"model": "rev", "messages": [{"role": "user", "content": "abc"}]},
                 "rev is a seq2seq model")):
            status, said = server.post(path, body)
            assert status == 400 and said["error"]["message"].startswith(message), said
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page()
            page.goto(server.url + "/")
            assert "seq2seq: it writes a target for each source" in page.text_content("#model")
            assert page.is_hidden("#temperature") and page.input_value("#max-tokens") == "5"
            page.fill("#question", "abcd")
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelector('.msg.assistant, .msg.error').dataset.done === 'true'")
            assert page.locator(".msg.assistant").text_content() == "dcba" and page.locator(".note").count() == 0
            browser.close()
    finally:
        server.stop()


def test_a_seq2seq_model_without_data_learns_the_bundled_pairs(tmp_path):
    cli = CLI(tmp_path)
    said = cli("train", "--model", "seq2seq", "--n-layer", "1", "--n-embd", "16", "--steps", "1", "--quiet",
               "--eval-tokens", "400")
    scored = int(re.search(r"^val: [\d.]+ % of (\d+) held-out outputs exactly right", said.stdout, re.M).group(1))
    assert 5 <= scored <= 20  # the outputs of the pairs validated (about 400 tokens of 2,000 numbers in words), not all
    assert said.stdout.splitlines()[-1] == ("next: fournil eval runs/nombres-seq2seq  |  fournil sample "
                                            "runs/nombres-seq2seq --prompt SOURCE  |  fournil embeddings "
                                            "runs/nombres-seq2seq")  # not explain, which scores a text
    settings = json.loads((tmp_path / "runs" / "nombres-seq2seq" / "config.json").read_text())
    assert settings["data"]["data"] == "nombres" and settings["model"]["family"] == "seq2seq"
    typed = cli("sample", "runs/nombres-seq2seq", "--prompt", "1234")  # read as the sources are written
    assert typed.stderr.strip() == "(read as '1 234', as the training sources write it)"
    assert typed.stdout == cli("sample", "runs/nombres-seq2seq", "--prompt", "1 234").stdout
    from fournil.runs import Run

    with pytest.raises(FournilError, match=r"is a seq2seq model: it writes a target for a source, given with "
                                           r"Run\.translate\(sources\)"):  # (a TypeError from deep inside)
        Run.load(tmp_path / "runs" / "nombres-seq2seq", "cpu").sample(2)
    refused = cli("sample", "runs/nombres-seq2seq", "--prompt", "1000000", check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "fournil: error: '1000000' is not a number from 0 to 999 999, which nombres writes in words")


def test_seq2seq_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    cli = InProcess(capsys, monkeypatch, tmp_path)  # fournil's entry point in this process: no start-up for each
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab here\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n', encoding="utf-8")
    (tmp_path / "misnamed.jsonl").write_text('{"txt": "a"}\n', encoding="utf-8")  # (a corpus, meant)
    for args, message in {
        ("train", "--model", "gpt", "--data", "nombres"): "train a seq2seq model on it (--model seq2seq)",
        ("train", "--model", "seq2seq", "--data", "names"): "a seq2seq model learns from (source, target) pairs",
        ("train", "--model", "seq2seq", "--data", "bad.tsv"): "bad.tsv, line 2: a TSV line is a source, one tab",
        ("train", "--model", "seq2seq", "--data", "bad.jsonl"): "bad.jsonl, line 2: each record needs text fields",
        ("train", "--data", "misnamed.jsonl"): "misnamed.jsonl, line 1: each record needs text fields 'source' and "
            "'target' (this one has 'txt'); a corpus of documents has a 'text' field instead",
        # the records of another command, named
        ("train", "--data", str(data_path("rasbt_instructions", BUNDLED_INSTRUCTIONS, "instruction"))):
            "line 1: each record needs text fields 'source' and 'target'; this file holds instructions: learn from "
            "them with fournil finetune",
        # fractions that do not add up to 1 (pairs gave the test split what was left; running text was checked)
        ("train", "--model", "seq2seq", "--split", "0.3,0.3,0.3"):
            "--split must be three positive fractions that add up to 1, e.g. 0.9,0.05,0.05 (got 0.3,0.3,0.3)",
        ("train", "--data", "names", "--split", "1,0,0"): "--split must be three positive fractions that add up to 1",
    }.items():
        result = cli(*args, check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
