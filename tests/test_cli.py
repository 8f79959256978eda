"""The command line end to end, on the bundled data and on tiny budgets."""
import json
import math
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from conftest import InProcess
from matplotlib.image import imread
from safetensors import safe_open

from fournil.data.instructions import BUNDLED_INSTRUCTIONS, data_path


def test_every_model_trains_into_a_complete_run_directory(trained):
    for model, run in trained.items():
        for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "samples.txt"):
            assert (run / name).exists(), f"{model}: {name} missing"
        config = json.loads((run / "config.json").read_text())
        assert config["model"]["family"] == model and config["data"]["data"] == "names"
        samples = (run / "samples.txt").read_text().splitlines()
        assert len(samples) == 20
        assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "val_loss" in metrics[-1]
        if model != "ngram":
            losses = [m["train_loss"] for m in metrics if "train_loss" in m]
            assert losses[-1] < losses[0] < 3.5  # learning, from about log(27) = 3.3
    from fournil.runs import Run

    infos = {model: Run.load(run, "cpu").info() for model, run in trained.items()}
    shapes = {model: info["shape"] for model, info in infos.items()}  # each family's own
    assert shapes["ngram"] == "n 2" and shapes["rnn"].startswith("cell gru, n_layer ")  # (the n-gram's was empty)
    assert shapes["mlp"].startswith("context ") and shapes["gpt"] == "n_layer 2, n_head 4, n_embd 32"
    longest = Run.load(trained["gpt"], "cpu").model.config.block_size  # what one prediction reads, not the longest name
    assert [infos[m]["context"] for m in ("ngram", "mlp", "gpt")] == ["1 token", "5 tokens", f"{longest} tokens"]
    assert infos["mlp"]["model"] == "mlp (from a fournil run directory)"  # (not "mlp (mlp, ...)")


def test_eval_prints_nll_perplexity_and_bits(cli, trained):
    out = cli("eval", trained["ngram"]).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"val", "test"}
    tokens, nll, ppl, bpc = int(rows["test"][1].replace(",", "")), *map(float, rows["test"][2:5])
    assert 1500 * 7 < tokens < 1700 * 8  # 5% of 32,033 names, about 7 tokens each
    assert 2.4 < nll < 2.6
    assert ppl == pytest.approx(2.718281828 ** nll, rel=1e-3)
    assert bpc == pytest.approx(nll / 0.693147, rel=1e-3)
    assert re.search(r"ngram, [\d,]+ parameters", out)


def test_eval_scores_a_text_file_or_a_bundled_dataset_s_test_split(cli, trained, bpe_llama, tmp_path):
    import fournil
    from fournil import TrainConfig
    from fournil.runs import Run

    table = lambda out: {line.rsplit(None, 5)[0]: line.split()[-5:] for line in out.splitlines()[2:]}  # noqa: E731
    own = table(cli("eval", trained["ngram"]).stdout)["test"]
    assert table(cli("eval", trained["ngram"], "--data", "names").stdout) == {"names (test split)": own}
    (tmp_path / "two.txt").write_text("emma\n\nolivia\n")  # one name a line, as the run read its data
    run = Run.load(trained["ngram"], "cpu")
    what, scores = run.score_text(str(tmp_path / "two.txt"))
    by_hand = run.explain("emma")["nll"] + run.explain("olivia")["nll"]  # each name framed by the boundary
    assert what == "two.txt" and scores["tokens"] == 5 + 7 and scores["nll"] * 12 == pytest.approx(by_hand, rel=1e-6)
    chat = Run.load(bpe_llama, "cpu")  # running text, in windows of the context: the first N tokens of them
    assert chat.score_text("shakespeare", 300)[1] == chat.evaluate(("test",), max_tokens=300)["test"]
    assert table(cli("eval", bpe_llama, "--data", "shakespeare", "--tokens", "300").stdout)[
        "shakespeare (test split)"][0] == "300"
    tuned = fournil.finetune(str(bpe_llama), "rasbt_instructions", train=TrainConfig(steps=1, eval_every=1),
                             out=str(tmp_path / "tuned"), progress=False, announce=lambda _: None)
    assert tuned.score_text("shakespeare", 50)[1]["tokens"] == 50  # (its own data is instructions: text is text)
    one_line_error(cli("eval", trained["ngram"], "--tokens", "5", check=False), "--tokens goes with --data")
    one_line_error(cli("eval", trained["ngram"], "--data", "names", "--tokens", "0", check=False), "--tokens 0")
    one_line_error(cli("eval", trained["ngram"], "--data", "shakespeare", check=False),  # a letter it never saw
                   "shakespeare: ' ', ", "are not in the model's vocabulary")


def test_eval_of_several_runs_is_one_table_a_row_each(cli, trained, running_text):
    runs = [trained[m] for m in ("ngram", "mlp", "gpt", "llama")]
    shown = cli("eval", *runs)
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["run", "model", "parameters", "val", "nll", "test", "nll", "ppl", "bits/char",
                                "bits/byte"]
    rows = {Path(line.split()[0]): line.split()[1:] for line in lines[1:-1]}
    assert list(rows) == runs and lines[-1].startswith("nll: nats per token; ppl, bits per character and per byte: "
                                                       "on test; scored in float32 on cpu")
    assert shown.stderr == ""  # the same data, split alike, and the same tokens: nothing to warn of
    for run in (trained["ngram"], trained["llama"]):  # each row says what `fournil eval RUN` says
        alone = {line.split()[0]: line.split() for line in cli("eval", run).stdout.splitlines()[2:]}
        params = re.search(r", ([\d,]+) parameters", cli("eval", run).stdout)[1]
        assert rows[run] == [run.name.split("-")[1], params, alone["val"][2], *alone["test"][2:6]]

    on_names = cli("eval", trained["ngram"], trained["gpt"], "--data", "names").stdout.splitlines()
    assert on_names[0].split()[3:5] == ["tokens", "nll"] and "on the text;" in on_names[-1]
    assert on_names[1].split()[4:] == rows[trained["ngram"]][3:]  # names' test split is the run's own
    drawn = cli("eval", *runs, "--plot", "curves.png").stdout  # their val curves, from training, on one picture
    assert drawn.endswith("-> curves.png\n") and imread(cli.cwd / "curves.png").ndim == 3
    from fournil.cli.measuring import plot_curves
    from fournil.runs import Run

    loaded = [Run.load(run, "cpu") for run in runs]
    curves = plot_curves([(run, run.evaluate(("val",))) for run in loaded], True, str(cli.cwd / "again.png"))
    logged = [json.loads(line) for line in (trained["gpt"] / "metrics.jsonl").read_text().splitlines()]
    assert curves[str(trained["gpt"])] == [(m["time"], m["val_loss"]) for m in logged if "val_loss" in m]
    ((time, counted),) = curves[str(trained["ngram"])]  # counted in one pass: one figure, no time (a level across)
    assert time is None and counted == pytest.approx(float(rows[trained["ngram"]][2]), abs=5e-5)
    in_bytes = plot_curves([(run, run.evaluate(("val",))) for run in loaded[:2]], False, str(cli.cwd / "b.png"))
    scale = float(rows[trained["mlp"]][6]) / float(rows[trained["mlp"]][3])  # (bits per byte / nll, of test: close)
    assert [v for _, v in in_bytes[str(trained["mlp"])]] == pytest.approx(
        [v * scale for _, v in curves[str(trained["mlp"])]], rel=0.02)
    one_line_error(cli("eval", trained["gpt"], "--plot", "x.png", check=False), "--plot draws several runs' "
                   "validation curves on one picture; a run's own are in its loss.png")
    one_line_error(cli("eval", *runs[:2], "--data", "names", "--plot", "x.png", check=False), "--plot draws the "
                   "runs' validation curves, from their training, not scores on --data: give one or the other")
    one_line_error(cli("eval", trained["gpt"], "--data", str(data_path("rasbt_instructions", BUNDLED_INSTRUCTIONS,
                                                                        "instruction")), check=False),
                   "holds instructions, whose answers are scored in a chat template, and", "is a character model (it "
                   "knows only the characters of its data, and no way to end a turn): score it on text")  # (it scored
    # JSON's syntax)
    mixed = cli("eval", trained["gpt"], running_text)
    assert mixed.stderr == ("these runs learned from different data or splits: their scores do not compare; score "
                            "them on the same text with --data\n")
    one_line_error(cli("eval", trained["gpt"], "names", check=False), "names is a dataset, not a run: score a run "
                   f"on it with `fournil eval {trained['gpt']} --data names`")


def on_a_terminal(code: str, cwd: Path) -> str:
    """What ``python -c code`` writes to a terminal 100 columns wide (a pseudo-terminal: tqdm draws nothing on a
    terminal of width 0, nor anything but a terminal)."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    ours, theirs = pty.openpty()
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    process = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdin=subprocess.DEVNULL, stdout=theirs,
                               stderr=theirs)
    os.close(theirs)
    written = b""
    while True:
        try:
            chunk = os.read(ours, 65536)
        except OSError:  # (EIO: the process has closed the terminal)
            break
        if not chunk:
            break
        written += chunk
    os.close(ours)
    assert process.wait(timeout=120) == 0, written.decode(errors="replace")
    return written.decode()


def test_a_long_scoring_shows_a_bar_on_a_terminal_and_clears_it(cli, trained, tmp_path):
    # (every pass lasts longer than no time: a bar at once, as a pass of minutes shows it after BAR_AFTER seconds)
    code = (f"import fournil.evaluate.metrics as m; m.BAR_AFTER = 0; from fournil.cli import main; "
            f"main(['eval', {str(trained['gpt'])!r}])")
    written = on_a_terminal(code, tmp_path)
    for split in ("val", "test"):  # a bar of the split's tokens, then a blank line over it: cleared
        assert re.search(rf"\rscoring {split}: +\d+%\|.*\| [\d.]+k?/[\d.]+k \[.*tok/s\]\r {{99}}\r", written)
    assert re.search(r"\r\ntest +[\d,]+ +\d\.\d{4}", written)  # and the table
    assert "scoring" not in cli("eval", trained["gpt"]).stderr  # a log or a pipe gets no bar


def test_a_chat_message_beyond_the_context_is_left_out_and_the_advice_fits(cli, bpe_llama):
    long = "the cat " * 600  # about 1,800 tokens, for a context of 1,024
    result = cli("chat", bpe_llama, "--max-new-tokens", "3", "--temperature", "0", input=f"{long}\nhi\n{long}\n")
    first, again = re.findall(r"^\(the conversation, ([\d,]+) tokens, fills the model's context of 1,024: (.*)\)$",
                              result.stderr, re.M)
    assert first[1] == "send a shorter message"  # alone in the conversation: /reset would not help (it said to)
    assert again[1] == "/reset to start over, or send a shorter message"
    assert int(again[0].replace(",", "")) > int(first[0].replace(",", ""))
    # the messages left out were not answered, nor kept: "hi" got the answer it gets alone
    assert result.stdout == cli("chat", bpe_llama, "--max-new-tokens", "3", "--temperature", "0", input="hi\n").stdout


def test_generate_reads_its_prompt_from_the_standard_input_when_told_with_a_dash(cli, bpe_llama):
    args = ("--max-new-tokens", "6", "--temperature", "0")
    given = cli("generate", bpe_llama, "the cat", *args).stdout
    assert cli("generate", bpe_llama, "-", *args, input="the cat\n").stdout == given  # (its newline is the input's end)
    piped = cli("generate", bpe_llama, *args, input="the cat\n")  # a pipe unasked: not read (it may never end), said
    assert "(generating from nothing: the standard input is read as the prompt with -" in piped.stderr
    assert not piped.stdout.startswith("the cat") and "generating from nothing" not in cli("generate", bpe_llama,
                                                                                           *args).stderr


def test_sample_counts_what_it_memorised(cli, trained):
    result = cli("sample", trained["gpt"], "-n", "7", "--seed", "3", "--prompt", "ma", "--temperature", "0.8")
    samples = result.stdout.splitlines()
    assert len(samples) == 7 and all(s.startswith("ma") for s in samples)
    assert re.search(r"^\d of 7 samples are in the training set$", result.stderr.strip(), re.M)
    again = cli("sample", trained["gpt"], "-n", "7", "--seed", "3", "--prompt", "ma", "--temperature", "0.8",
                env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert again.stdout == result.stdout  # a seed makes it reproducible
    assert re.search(r"\| +torch$", again.stderr, re.M)  # (the variable is read as Python starts: a Python afresh)
    assert not re.search(r"\| +torch\._dynamo$", again.stderr, re.M)  # what compiles nothing does not import it (0.9 s)
    greedy = cli("sample", trained["ngram"], "-n", "3", "--temperature", "0")
    assert len(greedy.stdout.splitlines()) == 3 and len(set(greedy.stdout.splitlines())) == 1
    assert greedy.stderr.startswith("(temperature 0 is greedy decoding: each sample is the most likely text, the same "
                                    "every time; a temperature above 0 samples others)\n")  # (it looked like a bug)
    assert "--top-k 1 is greedy" in cli("sample", trained["ngram"], "-n", "2", "--top-k", "1").stderr
    assert "greedy" not in cli("sample", trained["ngram"], "-n", "1", "--temperature", "0").stderr


def test_sample_needs_no_training_set_to_sample(trained, tmp_path, capsys, monkeypatch):
    """Samples of a model with no training set at hand (imported, or trained on a file since changed or deleted) are
    printed, and the command succeeds: it printed them, then failed on counting them in the training set."""
    run = InProcess(capsys, monkeypatch, tmp_path)
    run("convert", trained["gpt"], "gpt.gguf")
    imported = run("sample", "gpt.gguf", "-n", "3")
    assert imported.returncode == 0 and len(imported.stdout.splitlines()) == 3 and imported.stderr == ""
    (tmp_path / "mine.txt").write_text("emma\nolivia\nava\nisabella\nsophia\nmia\n" * 20)
    run("train", "--model", "ngram", "--data", "mine.txt", "--out", "mine", "--quiet")
    assert re.fullmatch(r"\d of 3 samples are in the training set\n", run("sample", "mine", "-n", "3").stderr)
    for change, why in ((lambda f: f.write_text("zoe\n" * 200), "the data of mine changed since training"),
                        (Path.unlink, "no dataset or file named 'mine.txt'")):
        change(tmp_path / "mine.txt")
        result = run("sample", "mine", "-n", "3")
        assert result.returncode == 0 and len(result.stdout.splitlines()) == 3
        assert result.stderr.startswith(f"(not compared with the training set: {why}"), result.stderr


def test_output_piped_to_a_reader_that_leaves_stops_quietly(cli, trained):
    """`fournil sample -n 20000 | head -1`: the samples fill the pipe, its reader leaves after one line, and fournil
    stops as a Unix tool does (status 128 + SIGPIPE) without a word (it said "error: [Errno 32] Broken pipe")."""
    proc = cli.popen("sample", trained["gpt"], "-n", "20000")
    assert proc.stdout.readline().endswith("\n")  # a line (a sampled name may be empty: the boundary came first)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and proc.stderr.read() == ""


def test_sample_and_eval_without_a_run_read_the_run_started_last(cli, trained, tmp_path):
    one_line_error(cli("sample", check=False), "no run under runs/ here: train one with `fournil train`")
    for age, model in enumerate(("ngram", "gpt")):  # the gpt run started an hour before the ngram run
        shutil.copytree(trained[model], tmp_path / "runs" / f"names-{model}")
        os.utime(tmp_path / "runs" / f"names-{model}" / "config.json", (time.time() - 3600 * age,) * 2)
    result = cli("sample", "-n", "3", "--temperature", "0")
    assert "runs/names-ngram (the run started last; give a run directory to choose another)" in result.stderr
    assert result.stdout == cli("sample", trained["ngram"], "-n", "3", "--temperature", "0").stdout
    assert cli("eval").stdout.startswith("runs/names-ngram: ngram,")


def test_explain_prints_each_transition(cli, trained):
    out = cli("explain", trained["ngram"], "marley").stdout.splitlines()
    pairs = [line.split()[0] for line in out[:-1]]
    assert pairs == [".m", "ma", "ar", "rl", "le", "ey", "y."]
    probs = [float(line.split()[1]) for line in out[:-1]]
    assert all(0 < p < 1 for p in probs)
    total = float(re.search(r"NLL ([\d.]+) nats over 7 transitions", out[-1]).group(1))
    assert total == pytest.approx(-sum(math.log(p) for p in probs), abs=1e-2)


def test_explain_reads_a_text_longer_than_the_context_in_windows_of_it_half_a_context_apart(cli, trained):
    """60 characters and the two ends of a name for a context of 16 (refused before): the first window predicts the
    first 16 tokens, each later one the next 8 after the 16 before them (the last one, cut short by the text's end,
    after 16 too), so that each token is predicted from 9 to 16 tokens, as a pass over those alone gives it."""
    import torch

    from fournil.evaluate.explain import framed
    from fournil.runs import Run

    run = Run.load(trained["gpt"], "cpu")
    block, text = run.model.config.block_size, "abcdefghij" * 6
    out = cli("explain", trained["gpt"], text).stdout
    assert f"(the text is longer than the model's context of {block} tokens: past it, each token was predicted from " \
           f"the {block - block // 2 + 1} to {block} tokens before it)" in out
    shown = [float(line.split()[1]) for line in out.splitlines() if re.match(r"\S\S \d\.\d{4}  rank", line)]
    ids = framed(run.tokenizer, text)
    assert len(ids) == 62 and block == 16 and len(shown) == 61
    windows = [range(1, 17)] + [range(t, t + 8) for t in range(17, 57, 8)] + [range(57, 62)]
    with torch.no_grad():
        for window in windows:
            for t in window:
                begin = max(0, window[-1] - block)  # (the 16 tokens before the window's last one)
                assert 9 <= t - begin <= 16 or window[0] == 1
                probs = run.model(torch.tensor([ids[begin:t]]))[0, -1].softmax(-1)
                assert probs[ids[t]].item() == pytest.approx(shown[t - 1], abs=6e-5), t


def test_explain_and_attention_of_a_run_read_its_first_held_out_document_unless_given_a_text(cli, trained):
    """The default text is the run's own (a names model was given an English sentence, whose capitals and spaces it
    never saw: refused); an imported model's, or one given, is the text read."""
    from fournil.runs import Run

    first = Run.load(trained["gpt"], "cpu").splits().val[0]
    explained = cli("explain", trained["gpt"])
    assert f"(the first held-out document of {trained['gpt']}: {first!r}" in explained.stderr
    assert f"over {len(first) + 1} transitions" in explained.stdout  # each character, then the end of the name
    attention = cli("attention", trained["llama"])
    assert f"{len(first)} tokens, 2 layers x 4 heads" in attention.stdout and first in attention.stderr
    assert "held-out" not in cli("explain", trained["gpt"], "emma").stderr


def test_text_mode_on_running_text(cli, tmp_path):
    result = cli("train", "--data", "shakespeare", "--model", "gpt", "--steps", "20", "--n-embd", "32", "--n-layer",
                 "1", "--block-size", "32", "--eval-every", "10", "--out", "shk")
    # Not a terminal: one progress line per validation instead of a live bar.
    assert re.findall(r"^ *(\d+\.\d)% step (\d+), loss [\d.]+, val [\d.]+", result.stderr, re.M) == [("50.0", "10"), ("100.0", "20")]
    assert "text data shakespeare" in result.stdout and "best val NLL" in result.stdout
    config = json.loads((tmp_path / "shk" / "config.json").read_text())
    assert config["model"]["block_size"] == 32
    with safe_open(str(tmp_path / "shk" / "model.safetensors"), "pt") as f:
        assert "transformer.wte.weight" in f.keys() and "transformer.h.0.attn.c_attn.weight" in f.keys()
    out = cli("sample", "shk", "-n", "1", "--prompt", "ROMEO:", "--max-new-tokens", "50", "--seed", "1").stdout
    assert out.startswith("ROMEO:") and len(out) >= 50


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fournil: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_every_flag_and_argument_of_every_command_says_what_it_does(cli):
    import argparse

    from fournil.cli import parser

    def flags(p, path=()):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from flags(sub, (*path, name))
            elif action.help != argparse.SUPPRESS:
                yield " ".join(path), action
    silent = [f"{command} {(action.option_strings or [action.dest])[-1]}" for command, action in flags(parser())
              if not action.help]
    assert not silent  # (--top-k, --seed, --device, 23 model settings, tokenize's text... said nothing)
    # a model setting names the families it applies to and their defaults, on lines and on running text
    shown = " ".join(cli("train", "--help").stdout.split())
    assert "--n INT the n-gram's order (2 = bigram, 3 = trigram): ngram 2 " in shown
    assert "--n-embd INT width of the embeddings and hidden states: mlp 24, rnn 64, gpt 64 (128 on text), llama 64 " \
           "(128 on text), seq2seq 128 " in shown
    assert "--head-dim INT width of each head (default: n_embd / n_head): llama " in shown  # (not "llama 0")
    # and every flag its default, where its help did not say it (the distillation's temperature and weight did not)
    assert "--split SPLIT train,val,test fractions (default: 0.9,0.05,0.05) " in shown
    shown = " ".join(cli("distill", "--help").stdout.split())
    assert "--kd-temperature KD_TEMPERATURE softens both distributions (default: 2.0) " in shown
    assert "--student STUDENT layers:N (N of the teacher's layers and its embeddings), a model config .json (from " \
           "scratch, the teacher's vocabulary), or a run with the teacher's tokenizer (default: layers:4, or half " \
           "the layers of a teacher of fewer than 8) " in shown
    shown = " ".join(cli("arena", "judge", "--help").stdout.split())  # (a command's action too)
    assert "-n NUM, --num NUM how many prompts (the last ones of the set) (default: 40) " in shown


def test_fournil_alone_lists_its_commands_and_a_mistyped_one_gets_the_nearest(tmp_path, capsys, monkeypatch):
    from fournil import __version__
    from fournil.cli import COMMANDS

    run = InProcess(capsys, monkeypatch, tmp_path)
    listed = run()  # (a usage error before, naming no command's purpose)
    assert listed.returncode == 0 and "fournil COMMAND --help" in listed.stdout
    assert all(re.search(rf"^ +{name} +\w", listed.stdout, re.M) for name in COMMANDS)  # each with what it does
    one_line_error(run("trian"), "no command named 'trian'; did you mean 'train'? (fournil --help lists them)")
    one_line_error(run("xyz", "--steps", "1"), "no command named 'xyz' (fournil --help")
    one_line_error(run("reward", "runs/x"), "fournil reward takes what to do first, train or score: fournil reward "
                                            "train runs/x (fournil reward --help)")  # (a model where its action goes)
    one_line_error(run("reward", "scor", "runs/x"), "train or score; did you mean 'score'? (fournil reward --help)")
    for args, usage in ((("prepare", "--data", "corpus", "extra"), "usage: fournil prepare [-h] [--data DATA]"),
                        (("tokenizer", "train", "corpus", "--x"), "usage: fournil tokenizer train [-h] [--data DATA]")):
        stray = run(*args)  # the command's usage, not fournil's (`fournil [-h] [--version] COMMAND ...`)
        assert stray.returncode == 2 and stray.stderr.startswith(usage), stray.stderr
        assert stray.stderr.endswith(": error: fournil tokenizer train has no flag --x (`fournil tokenizer train "
                                     "--help` lists its flags)\n" if "--x" in args else
                                     ": error: unrecognized arguments: extra\n"), stray.stderr
    for args, said in ((("generate", "m", "-n", "3"), "has no flag -n: it is a flag of fournil sample"),  # another's
                       (("generate", "m", "--max-tokens=3"),
                        "has no flag --max-tokens; did you mean --max-new-tokens?"),
                       (("chat", "m", "--data", "x"), "has no flag --data: other commands take it")):
        refused = run(*args)  # (after the command's usage, as argparse's own errors)
        assert refused.returncode == 2 and refused.stderr.endswith(
            f"fournil {args[0]}: error: fournil {args[0]} {said} (`fournil {args[0]} --help` lists its flags)\n"), \
            refused.stderr
    for args, fixed in ((("prepare", "my corpus"), "--data 'my corpus'"),  # words where the command takes flags
                        (("train", "llama", "--steps", "3"), "--model llama --steps 3"),
                        (("finetune", "smollm2", "rasbt_instructions"), "smollm2 --data rasbt_instructions"),
                        (("distill", "smollm2", "shakespeare"), "--teacher smollm2 --data shakespeare"),
                        (("bench", "smollm2", "hellaswag"), "smollm2 --tasks hellaswag")):
        placed = run(*args)
        assert placed.returncode == 2 and f"error: fournil {args[0]} takes " in placed.stderr
        assert placed.stderr.endswith(f" as a flag: fournil {args[0]} {fixed}\n" if args[0] != "distill" else
                                      f" as flags: fournil {args[0]} {fixed}\n"), placed.stderr
    for args, usage in ((("convert", "run", "--out", "x.gguf"), "fournil convert MODEL OUT"),  # as other commands
                        (("merge", "run", "--out", "merged"), "fournil merge [BASE] ADAPTER OUT")):  # take --out
        flagged = run(*args)
        assert flagged.returncode == 2 and flagged.stderr.endswith(
            f"error: --out is not a flag of fournil {args[0]}: give OUT without it, in its place: {usage}\n")
    version = run("--version")  # what a bug report needs
    assert version.returncode == 0
    assert re.fullmatch(rf"fournil {re.escape(__version__)}, torch \S+, Python 3\.\d+\.\d+\n", version.stdout)


def test_bad_input_gets_one_line_and_exit_2(cli, tmp_path, trained, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("élise\nzoé\n".encode("latin-1") * 50)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "tiny.txt").write_text("anna\nbob\n")
    (tmp_path / "short.txt").write_text("to be or not to be, " * 3)
    # One real process, to see that nothing but the one line reaches the terminal...
    one_line_error(cli("train", "--data", "missing.txt", check=False), "no dataset or file named 'missing.txt'")
    # ...and the rest through the same entry point in this process.
    run = InProcess(capsys, monkeypatch, tmp_path)
    train = lambda *a: run("train", "--quiet", "--steps", "1", *a)  # noqa: E731
    one_line_error(train("--data", "empty.txt"), "is empty")
    one_line_error(train("--data", "latin1.txt"), "not valid UTF-8")
    one_line_error(train("--data", "blob.bin"), "binary")
    one_line_error(train("--data", "tiny.txt"), "2 documents", "too few")
    one_line_error(train("--data", "short.txt", "--mode", "text"), "context length")
    one_line_error(train("--model", "transformer"), "unknown model 'transformer'", "ngram, mlp, rnn, gpt")
    one_line_error(train("--model", "bigram"), "a bigram is fournil's n-gram model of order 2: --model ngram --n 2")
    one_line_error(train("--data", "nombrés"), "no dataset or file named 'nombrés' (did you mean nombres?)",
                   "prenoms")
    one_line_error(train("--data", "tinyshakespeare"), "'tinyshakespeare' (did you mean shakespeare?)")  # (its source's
    # name for it)
    one_line_error(train("--data", "rasbt_instructions"), "the bundled rasbt_instructions holds instructions, not "
                   "text: learn from it with fournil finetune")
    one_line_error(run("prepare", "--data", "hh_rlhf_harmless"), "the bundled hh_rlhf_harmless holds preference pairs")
    one_line_error(train("--model", "rnn", "--n-head", "4"), "--n-head does not apply to the rnn model")
    one_line_error(train("--model", "gpt", "--n-layer", "two"), "n_layer='two': expected a whole number")
    one_line_error(train("--model", "llama", "--n-head", "3"), "n_head (3) must be a multiple of n_kv_head (2): give "
                   "--n-kv-head 1, say")  # (the default n_kv_head, which the user never gave)
    one_line_error(run("sample", "runs/nothing-here"), "no run directory")
    one_line_error(run("attention", trained["gpt"], "a" * 60), "the text has 60 tokens; the model's context is 16: "
                   "give a shorter text")
    one_line_error(run("generate", trained["gpt"], "a" * 60), "the model's context is 16: shorten it to 15 tokens at "
                   "most, to leave room for the answer")
    one_line_error(run("generate", trained["gpt"], "ab", "--draft-tokens", "3"), "--draft-tokens is how many tokens a "
                   "draft model proposes: give it with --draft MODEL")  # (it was ignored)
    one_line_error(run("info", Path(trained["gpt"]) / "model.safetensors"), "model.safetensors is a file but not a "
                   "model: fournil reads .gguf files, and run directories and Hugging Face folders (give the folder")
    one_line_error(run("eval", tmp_path), "has no config.json: fournil reads run directories, Hugging Face folders")
    one_line_error(run("sample", trained["gpt"], "--prompt", "z3!"), "'!', '3' are not in the model's vocabulary")
    # bytes that are not UTF-8, as a terminal in another encoding sends them (Python keeps them as half surrogates)
    one_line_error(run("explain", trained["gpt"], os.fsdecode(b"a\xe9b")), "the argument b'a\\xe9b' is not UTF-8 text")
    one_line_error(run("explain", trained["gpt"], "x", "--device", "cuda"), "no CUDA GPU")
    (tmp_path / "long.txt").write_text("emma\n" + "a" * 15 + "\n" + "b" * 16 + "\n" + "c" * 17 + "\n", encoding="utf-8")
    one_line_error(run("eval", trained["gpt"], "--data", str(tmp_path / "long.txt")), "long.txt: 2 of its 4 lines "
                   "are longer than this model reads (15 tokens, its context but for the line's start), the first "
                   "'bbbbbbbbbbbbbbbb': shorten or remove them")  # (it said to raise --block-size, which eval has not)
    one_line_error(elsewhere := train("--device", "cuda"), "no CUDA GPU")
    assert not elsewhere.stdout  # refused before the data is read and a budget announced
    one_line_error(run("explain", trained["gpt"], "emma", "--top", "0"), "--top 0: show at least 1 alternative")
    one_line_error(run("explain", trained["gpt"], "emma", "--question", "Who?"), "--question explains an answer in a "
                   "conversation, laid out by a chat template, and this model has none (it continues texts)")
    # the key of a remote model, given with none (it was ignored)
    one_line_error(run("generate", trained["gpt"], "ma", "--api-key-env", "MY_KEY"), f"--api-key-env MY_KEY names the "
                   f"key of a remote model (openai:NAME@URL), and {trained['gpt']} is loaded here: leave it out")
    one_line_error(run("distill", "--api-key-env", "MY_KEY"), "and smollm2 is loaded here: leave it out")
    one_line_error(run("arena", "judge", trained["gpt"], trained["llama"], "--judge", trained["gpt"], "--api-key-env",
                       "MY_KEY"), "are loaded here: leave it out")
    one_line_error(run("explain", trained["gpt"], "emma", "--out", "nodir/emma.png"),  # (not "[Errno 2] ...")
                   "nodir/emma.png: the folder nodir does not exist; create it, or choose another path")
    refused = run("explain", trained["gpt"], "emma", "--out", "emma")  # (matplotlib wrote emma.png, said "-> emma")
    assert refused.returncode == 2 and "'emma' is not a picture's name: end it with .png (or .svg" in refused.stderr
    one_line_error(run("explain", trained["llama"].parent / "none", "emma"), "no run directory")
    one_line_error(run("sample", trained["gpt"], "--top-p", "2"), "--top-p")
    # (before: 0 sampled to the usual length, NaN a traceback from torch.multinomial, a beam ignored)
    one_line_error(run("sample", trained["gpt"], "--max-new-tokens", "0"), "--max-new-tokens must be at least 1 (got 0)")
    one_line_error(run("sample", trained["gpt"], "--temperature", "nan"), "--temperature must be 0 (greedy) or more")
    one_line_error(run("sample", trained["ngram"], "--beam", "3"), "--beam searches a seq2seq model's outputs, and the "
                   f"model of {trained['ngram']} is ngram: leave --beam out")  # (it said "holds a ngram model")
    one_line_error(run("chat", trained["gpt"]), "this model has no chat template")  # (an AttributeError before)
    one_line_error(run("arena", "judge", trained["gpt"], trained["llama"], "--judge", "smollm2", "--db",
                       str(tmp_path / "arena.sqlite")), f"{Path(trained['gpt']).name}: this model has no chat template")
    usage = run("train", "--time", "soon")
    assert usage.returncode == 2 and "is not a duration" in usage.stderr
    one_line_error(train("--n-embd", "30", "--n-head", "4", "--out", "odd"), "n_embd (30) must be a multiple of n_head")
    assert not (tmp_path / "odd").exists()  # a refused run leaves no folder that would block the next try
    one_line_error(train("--model", "ngram", "--out", trained["ngram"]), f"{trained['ngram']} already holds a run",
                   f"--resume {trained['ngram']}", "another with --out")  # never overwritten, never renamed
    taken = run("train", "--quiet", "--out", trained["gpt"])  # (a default budget: sized by measuring the speed)
    one_line_error(taken, f"{trained['gpt']} already holds a run")
    assert not taken.stdout  # refused before the budget was measured and announced
    for command, old, new in (("finetune", "--alpha", "--lora-alpha"), ("distill", "--alpha", "--kd-weight"),
                              ("distill", "--temperature", "--kd-temperature"),
                              ("arena", "--max-tokens", "--max-new-tokens")):  # (as generate, chat and bench name it)
        renamed = run(command, old, "1")
        assert renamed.returncode == 2 and f"{old} is now {new}" in renamed.stderr
    renamed = run("arena", "judge", "--n", "1")  # (train's --n is an n-gram's order)
    assert renamed.returncode == 2 and "--n is now -n" in renamed.stderr


def test_data_settings_that_would_not_count_are_refused(tmp_path, capsys, monkeypatch):
    """Data given as three files is named by the training file (the run was runs/prenoms-gpt, "lines data prenoms");
    a setting the data's form leaves unused is refused, not ignored and recorded as if it had counted."""
    run = InProcess(capsys, monkeypatch, tmp_path)
    names = ["emma", "olivia", "ava", "mia", "zoe", "lea", "anna", "nora"]
    for i, part in enumerate(("a.txt", "b.txt", "c.txt")):
        (tmp_path / part).write_text("\n".join(names[i:] * 5) + "\n")
    files = ("--train", "a.txt", "--val", "b.txt", "--test", "c.txt")
    said = run("train", "--model", "ngram", *files).stdout
    assert "ngram; lines data a.txt;" in said and "-> runs/a-ngram" in said
    assert json.loads((tmp_path / "runs" / "a-ngram" / "config.json").read_text())["data"]["data"] == "a.txt"
    for asked, message in (
            (("--data", "names", *files), "--data names and --train/--val/--test name the data twice: give --data "
                                          "(fournil splits it) or the three files"),
            ((*files, "--split", "0.8,0.1,0.1"), "--split: the data is split already, into --train, --val and --test"),
            ((*files, "--split-seed", "3"), "--split-seed: the data is split already"),
            (("--data", "shakespeare", "--split-seed", "3"), "--split-seed: running text is cut in order (train, then "
                                                             "val, then test), not shuffled; leave it out"),
            (("--data", "nombres", "--model", "seq2seq", "--mode", "lines"), "--mode lines: nombres holds (source, "
                                                                             "target) pairs, read as pairs")):
        one_line_error(run("train", *asked, "--out", "refused"), message)
        assert not (tmp_path / "refused").exists()


def test_loose_numbers_are_refused_before_any_work(cli, trained, tmp_path, capsys, monkeypatch):
    run = InProcess(capsys, monkeypatch, tmp_path)
    one_line_error(run("train", "--steps", "-5"), "--steps must be at least 1 (got -5)")
    one_line_error(run("train", "--time", "0s"), "--time must be longer than 0 s")
    one_line_error(run("train", "--lr", "-1"), "--lr must be a positive learning rate")
    for dropout in ("1", "1.5"):
        one_line_error(run("train", "--dropout", dropout), f"--dropout must be in [0, 1), the share of activations "
                                                           f"zeroed while training (got {float(dropout)})")
    for flags, error in ((("--n-embd", "0"), "--n-embd must be at least 1 (got 0)"),  # (PyTorch's traceback before)
                         (("--model", "rnn", "--n-layer", "0"), "--n-layer must be at least 1 (got 0)"),
                         (("--model", "seq2seq", "--data", "nombres", "--n-head", "0"), "--n-head must be at least 1"),
                         (("--model", "llama", "--n-embd", "0"), "--n-embd must be at least 1"),  # (0 weights before)
                         (("--model", "llama", "--sliding-window", "0"), "--sliding-window must be at least 1"),
                         (("--model", "llama", "--rope-theta", "-5"), "--rope-theta and --rms-norm-eps must be above 0")):
        one_line_error(run("train", *flags), error)
    one_line_error(run("train", "--resume", trained["gpt"], "--steps", "0"), "--steps must be at least 1 (got 0)")
    one_line_error(run("finetune", trained["gpt"], "--eval-every", "0"), "--eval-every must be at least 1")
    one_line_error(run("finetune", trained["gpt"], "--lora-rank", "16"),  # (every weight trained, the rank ignored)
                   "--lora-rank sets a LoRA adapter: add --lora, or leave it out to tune every weight")
    one_line_error(run("finetune", trained["gpt"], "--lora", "--lora-rank", "0"), "--lora-rank must be at least 1")
    one_line_error(run("finetune", trained["gpt"], "--lora", "--lora-alpha", "0"),  # (an adapter that does nothing)
                   "--lora-alpha must be positive (got 0): the adapter's update is scaled by alpha / rank")
    one_line_error(run("finetune", trained["gpt"], "--max-length", "0"), "--max-length must be at least 1 token (got 0)")
    one_line_error(run("distill", "--eval-tokens", "0"), "--eval-tokens must be at least 1 (got 0)")
    one_line_error(run("serve", trained["gpt"], "--max-batch", "0"), "--max-batch must be at least 1")
    for port in ("99999", "-1", "http"):  # (uvicorn would say it listens on 99999, and listen nowhere)
        refused = run("serve", trained["gpt"], "--port", port)
        assert refused.returncode == 2 and f"'{port}' is not a port: give a number from 1 to 65535" in refused.stderr
    one_line_error(run("convert", trained["gpt"], "/nonexistent/dir/x.gguf"),
                   "cannot write /nonexistent/dir/x.gguf: the folder /nonexistent/dir does not exist")
    one_line_error(run("tokenize", ""), "the text is empty: give one to cut")
    one_line_error(run("tokenize", "Emma", "--tokenizer", str(tmp_path)),  # (the system's words on tokenizer.json)
                   f"{tmp_path} holds no tokenizer.json: give a tokenizer.json, or a folder with one (a run, ")
    one_line_error(run("prepare", "--tokenizer", "nope.json"), "no tokenizer nope.json: no such file or folder; give")
    for command in ("train", "prepare"):  # (the size left out: "no such file" before, from train)
        one_line_error(run(command, "--tokenizer", "bpe"), "--tokenizer bpe: write bpe:N with N the vocabulary size")
    one_line_error(run("attention", trained["llama"], "emma", "--token", "zz"),  # (a picture with no row shown)
                   "--token 'zz': no token of the text reads as this; its tokens are 'e', 'm', 'm', 'a'")
    one_line_error(run("tokenize", "Emma", "--tokenizer", "char", "--tokenizer", str(trained["gpt"])),  # which one
                   f"{trained['gpt']}: 'E' is not in the model's vocabulary")
    before = {p.name: p.read_bytes() for p in Path(trained["gpt"]).iterdir()}
    for command in (("convert", trained["gpt"], trained["gpt"]), ("merge", trained["gpt"], "x", trained["gpt"])):
        one_line_error(run(*command), f"{trained['gpt']} already exists: fournil does not write over it")
    for command in (("merge", trained["gpt"], "no-adapter", "merged"), ("merge", "no-adapter", "merged")):
        one_line_error(run(*command), "no-adapter does not exist: give a folder with a PEFT LoRA adapter (a run of ")
    one_line_error(run("merge", trained["gpt"], tmp_path, "merged"),
                   f"{tmp_path} holds no adapter_config.json: give a folder with a PEFT LoRA adapter")
    run("convert", trained["gpt"], tmp_path / "hf")  # (its config.json was read as a run's: "damaged ('model')")
    for model in (trained["gpt"], tmp_path / "hf"):  # a model of its own, given as the adapter, with a base or none
        for command in (("merge", trained["gpt"], model, "merged"), ("merge", model, "merged")):
            one_line_error(run(*command), f"{model} is a whole model, not a LoRA adapter: there is nothing to merge; "
                           f"use it as it is (fournil generate {model} TEXT, fournil convert {model} OUT)")
    (tmp_path / "peft").mkdir()  # an adapter of PEFT's, which does not say which base it is on as fournil's runs do
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["q"]}')
    one_line_error(run("merge", tmp_path / "peft", "merged"), f"{tmp_path / 'peft'} names no base model (it is not a "
                   f"LoRA run of fournil): give the base first, fournil merge BASE {tmp_path / 'peft'} merged")
    for command in ("tokenizer", "prepare"):  # (each wrote its tokenizer.json over the run's)
        one_line_error(run(command, "--data", "names", "--out", trained["gpt"]),
                       f"{trained['gpt']} is not a folder of fournil {command}'s own (config.json, ")
    assert {p.name: p.read_bytes() for p in Path(trained["gpt"]).iterdir()} == before  # (it overwrote the run)
    assert not (tmp_path / "runs").exists()  # nothing was trained
    generated = cli("generate", trained["gpt"], "hi", "--temperature", "-1", check=False)
    one_line_error(generated, "--temperature must be 0 (greedy) or more")
    one_line_error(run("generate", trained["gpt"], "hi", "--max-new-tokens", "0"),
                   "--max-new-tokens must be at least 1 (got 0)")
    assert generated.stdout == ""  # the prompt is not echoed before the error
    too_long = cli("generate", trained["gpt"], "e" * 100, check=False)
    one_line_error(too_long, "the prompt has")
    assert too_long.stdout == ""


def test_incomplete_run_says_how_to_continue(cli, tmp_path, trained):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((trained["gpt"] / "config.json").read_text())
    (broken / "tokenizer.json").write_text((trained["gpt"] / "tokenizer.json").read_text())
    one_line_error(cli("eval", broken, check=False), "incomplete", "model.safetensors", "--resume")


def test_the_commands_a_run_suggests_run_as_written_where_its_path_has_spaces(cli, tmp_path):
    """`next: fournil eval mes runs/prénoms` was two arguments to a shell; the path is now quoted where it must be."""
    out = cli("train", "--model", "ngram", "--data", "names", "--out", "mes runs/prénoms ngram", "--quiet").stdout
    suggested = out.splitlines()[-1].removeprefix("next: ").split("  |  ")
    assert suggested[0] == "fournil eval 'mes runs/prénoms ngram'"
    assert cli(*shlex.split(suggested[1])[1:]).stdout.strip()  # fournil sample, as a shell splits it
    again = cli("train", "--model", "ngram", "--data", "names", "--out", "mes runs/prénoms ngram", check=False)
    one_line_error(again, "continue it with --resume 'mes runs/prénoms ngram', or start another with --out "
                          "'mes runs/prénoms ngram-2'")


def test_chat_colours_each_token_of_an_answer_by_its_probability(cli, bpe_llama):
    """``/probs``: each piece of an answer on the colour of its token's probability (explain's scale, the model's own
    log-probabilities), its text unchanged; ``/probs`` again: plain text."""
    from fournil.generate import SamplingParams, complete
    from fournil.plots.explain import SCALE, band
    from fournil.runs import Run

    run = Run.load(bpe_llama, "cpu")
    greedy = complete(run.model, run.tokenizer, [run.tokenizer.chat_ids([{"role": "user", "content": "Speak."}])],
                      SamplingParams(8, temperature=0), run.dtype)[0]
    out = cli("chat", bpe_llama, "--temperature", "0", "--max-new-tokens", "8",
              input="/probs\nSpeak.\n/reset\n/probs\nSpeak.\n").stdout
    on, rest = out.split("\n", 1)
    coloured, plain = rest.split("\n(new conversation)\n(answers in plain text)\n")
    assert on.startswith("(answers coloured by each token's probability: ") and plain == greedy.text + "\n"
    pieces = re.findall(r"\x1b\[30;48;5;(\d+)m(.*?)\x1b\[0m", coloured, re.S)
    assert re.sub(r"\x1b\[[\d;]*m", "", coloured) == greedy.text  # the same answer, painted
    assert [text for _, text in pieces] == [run.tokenizer.decode([t]) for t in greedy.tokens]  # (a token each here)
    assert [int(code) for code, _ in pieces] == [SCALE[band(math.exp(lp))][1] for lp in greedy.logprobs]
