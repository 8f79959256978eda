"""Supervised fine-tuning: loss on answers only, tuned models that stop, LoRA adapters PEFT reads, clear errors."""
import dataclasses
import json
import math
import random
import shutil
import re

import pytest
import torch
from conftest import CLI, write_jsonl

from fournil.config import LoraConfig
from fournil.data.batches import IGNORE
from fournil.data.instructions import (InstructionData, data_path, load_examples, pack, read_conversations,
                                       render_example)
from fournil.data.preferences import BUNDLED_PREFERENCES
from fournil.errors import FournilError
from fournil.evaluate import evaluate_nll
from fournil.formats.peft import load_adapter, save_adapter
from fournil.generate import SamplingParams, complete
from fournil.models.lora import add_lora, merge_lora
from fournil.runs import Run
from fournil.train.trainer import eval_tokens


@pytest.fixture(scope="module")
def bpe_base(bpe_llama, tmp_path_factory):
    return tmp_path_factory.mktemp("sft"), bpe_llama


def test_prompt_tokens_carry_no_loss_and_the_end_of_turn_does(bpe_base):
    tok = Run.load(bpe_base[1], "cpu").tokenizer
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Good day"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good night"}]
    ids, learned = render_example(tok, chat)
    assert ids[: len(tok.chat_ids(chat[:1]))] == tok.chat_ids(chat[:1])  # the prompt as generation renders it
    x, y = InstructionData([(ids, learned)], 0, "train").sample(1, torch.Generator().manual_seed(0))
    targets = [t for t in y[0].tolist() if t != IGNORE]
    im_end = tok.encode("<|im_end|>")
    assert targets == tok.encode("Good day") + im_end + tok.encode("Good night") + im_end
    assert tok.decode(x[0][y[0] == IGNORE].tolist()).count("Hi there") == 1  # prompts are inputs, never targets
    shown = [{**m, "weight": 0} if m["content"] == "Good day" else m for m in chat]  # OpenAI's files: an answer
    again, kept = render_example(tok, shown)  # of weight 0 is read, not learned
    assert again == ids and [t for t, k in zip(again, kept) if k] == tok.encode("Good night") + im_end


def test_empty_answers_are_scored_by_their_end_of_turn_token_alone(bpe_base):
    """An example whose answer is empty teaches the end of the turn: its NLL is that token's, and no rate per
    character can be given (validation divided by zero characters)."""
    run = Run.load(bpe_base[1], "cpu")
    examples = [render_example(run.tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}])
                for q in ("Hi", "Again")]
    scores = evaluate_nll(run.model, InstructionData(examples, 0, "val"), run.tokenizer, torch.float32)
    assert scores["tokens"] == 2 and math.isfinite(scores["nll"]) and math.isnan(scores["bpc"])


def test_validation_reads_about_eval_tokens_answer_tokens_of_every_length():
    """--eval-tokens caps what training validates on instruction data too (it read every example)."""
    examples = [([1] * (5 + n), [False] * 5 + [True] * n) for n in range(1, 101)]  # answers of 1 to 100 tokens
    data = InstructionData(examples, 0, "val")

    def read(max_tokens):
        ys = [y for _, y in data.batches(8, max_tokens)]
        return sum(int((y != IGNORE).sum()) for y in ys), sorted(int((row != IGNORE).sum()) for y in ys for row in y)

    assert read(None) == (data.num_targets, list(range(1, 101)))
    scored, answers = read(data.num_targets // 10)
    assert abs(scored - data.num_targets / 10) < 0.1 * data.num_targets / 10 and answers[0] < 10 and answers[-1] > 90


def test_validation_is_sized_to_the_training_between_two_validations(bpe_base, tmp_path):
    """Adapting a model, validation scores an eighth of the answer tokens trained between two validations (at least
    4,096), as recorded and announced: SmolLM2 tuned with LoRA on gsm8k_train validated on all of its 46,108 val
    answer tokens, 147 s every 590 s of training. --eval-tokens is obeyed."""
    root, base = bpe_base
    rng = random.Random(0)
    words = ["king", "queen", "lord", "night", "blood", "crown", "sword", "heart", "death", "love", "grace", "honour"]
    rows = [{"instruction": f"Say {i}", "output": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}
            for i in range(3000)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    said = CLI(root)("finetune", base, "--data", data, "--steps", "2", "--lr", "1e-9",
                     "--batch-size", "2", "--quiet", "--out", "sized").stdout
    run = Run.load(root / "sized", "cpu")
    val = run.data(("val",))["val"]
    assert run.config.train.eval_tokens == 4096 < val.num_targets / 2  # (2 steps of 2 examples: the least)
    read = sum(len(x) for x, _ in val.batches(16, 4096))
    assert f"validating on {read} of the {len(val)} val examples" in said and read < len(val) / 2
    first = json.loads((root / "sized" / "metrics.jsonl").read_text().splitlines()[0])
    base_model = Run.load(base, "cpu").model
    part, whole = (evaluate_nll(base_model, val, run.tokenizer, run.measure_dtype, max_tokens=n)["nll"]
                   for n in (4096, None))
    assert first["val_loss"] == pytest.approx(part, rel=1e-5) and part != pytest.approx(whole, rel=1e-5)

    t = dataclasses.replace(run.config.train, eval_tokens=None, eval_every=250, batch_size=8)
    train = run.data(("train",))["train"]
    per_example = train.num_targets / round(0.9 * len(rows))
    assert eval_tokens(t, train) == pytest.approx(250 * 8 * per_example / 8, abs=1)
    assert eval_tokens(t) == 250_000 and eval_tokens(dataclasses.replace(t, eval_tokens=300), val) == 300
    said = CLI(root)("finetune", base, "--data", data, "--steps", "1", "--eval-tokens", "100000", "--quiet",
                     "--out", "whole").stdout
    assert "validating on" not in said and Run.load(root / "whole", "cpu").config.train.eval_tokens == 100_000


def test_a_model_tuned_on_gsm8k_is_sent_to_its_benchmark(bpe_base):
    """GSM8K's answers are scored right or wrong: a run tuned on gsm8k_train ends by saying how to measure that."""
    root, base = bpe_base
    said = CLI(root)("finetune", base, "--data", "gsm8k_train", "--steps", "1", "--batch-size", "2", "--eval-tokens",
                     "200", "--quiet", "--out", "gsm8k").stdout
    assert said.endswith(f"next: fournil chat gsm8k  |  fournil eval {base} gsm8k --data gsm8k_train  |  "
                         "fournil bench gsm8k --tasks gsm8k_chat --limit 50\n")


def test_eval_scores_the_answers_of_instructions_as_tuning_does(bpe_base, tmp_path):
    """`fournil eval MODEL --data INSTRUCTIONS` scores answers: a bundled set's test split, split and rendered as
    tuning did, so that a base and the model tuned from it compare on the answers tuning never saw (the tuned run's
    own test row); a file's examples, all, but those longer than the context allows. It refused both (not text)."""
    root, base = bpe_base
    cli = CLI(root)
    said = cli("finetune", base, "--data", "rasbt_instructions", "--steps", "3", "--lr", "3e-3", "--quiet", "--out",
               "rasbt").stdout
    assert f"next: fournil chat rasbt  |  fournil eval {base} rasbt --data rasbt_instructions\n" in said  # what to do
    own = re.search(r"^test\s+([\d,]+)\s+([\d.]+)", cli("eval", root / "rasbt").stdout, re.M).groups()
    table = cli("eval", base, root / "rasbt", "--data", "rasbt_instructions").stdout
    rows = dict((path, (tokens, nll)) for path, tokens, nll in
                re.findall(r"^(\S+)\s+llama\s+[\d,]+\s+([\d,]+)\s+([\d.]+)", table, re.M))
    tuned, before = Run.load(root / "rasbt", "cpu"), Run.load(base, "cpu").model
    test = tuned.data(("test",))["test"]
    untuned = evaluate_nll(before, test, tuned.tokenizer, tuned.measure_dtype)
    assert rows == {str(root / "rasbt"): own, str(base): (f"{untuned['tokens']:,}", f"{untuned['nll']:.4f}")}
    assert float(own[1]) < untuned["nll"] and untuned["tokens"] == test.num_targets > 100
    assert "ppl, bits per character and per byte: on the answers;" in table

    rows = [{"instruction": f"Say {w}", "output": w} for w in ("king", "queen", "lord", "night")]
    data = write_jsonl(tmp_path / "say.jsonl", rows + [{"instruction": "Say it", "output": "blood " * 1100}])
    said = cli("eval", base, "--data", data).stdout
    examples = InstructionData([e[:2] for e in load_examples(str(data), tuned.tokenizer, 512, print)], 0, "test")
    scores = evaluate_nll(before, examples, tuned.tokenizer, tuned.measure_dtype)
    assert len(examples) == 4 and f"say.jsonl: 4 examples (those longer than 512 tokens left out) " \
                                  f"{examples.num_targets:>9,} {scores['nll']:>8.4f}" in said


def test_a_tuned_model_answers_and_stops(bpe_base, tmp_path):
    root, base = bpe_base
    words = ["king", "queen", "lord", "night", "blood", "crown", "sword", "heart", "death", "love", "grace", "honour"]
    rng = random.Random(0)
    rows = [{"instruction": f"Say {w}", "output": w} for w in (rng.choice(words) for _ in range(300))]
    data = write_jsonl(tmp_path / "say.jsonl", rows)
    said = CLI(root)("finetune", base, "--data", data, "--steps", "120", "--lr", "3e-3", "--batch-size", "16",
                     "--quiet", "--out", "said").stdout
    run = Run.load(root / "said", "cpu")
    # where tuning started: the base model's NLL on the held-out answers, logged as step 0 and said beside the best
    first = json.loads((root / "said" / "metrics.jsonl").read_text().splitlines()[0])
    val = run.data(("val",))["val"]
    untuned, tuned = (evaluate_nll(model, val, run.tokenizer, run.measure_dtype, max_tokens=run.config.train.eval_tokens)
                      ["nll"] for model in (Run.load(base, "cpu").model, run.model))
    assert first == {"step": 0, "val_loss": pytest.approx(untuned, rel=1e-5)}
    assert f"val NLL {untuned:.4f} before tuning, best val NLL {tuned:.4f} nats/token" in said and tuned < untuned / 4
    prompts = [run.tokenizer.chat_ids([{"role": "user", "content": f"Say {w}"}]) for w in ("love", "crown", "king")]
    answers = complete(run.model, run.tokenizer, prompts, SamplingParams(max_new_tokens=30, temperature=0))
    assert all(a.finish_reason == "stop" for a in answers)  # it learned to end its turn
    assert [a.text for a in answers] == ["love", "crown", "king"]
    base_answers = complete(Run.load(base, "cpu").model, run.tokenizer, prompts, SamplingParams(30, temperature=0))
    assert all(a.finish_reason == "length" for a in base_answers)  # the base model never stopped
    shown = (root / "said" / "samples.txt").read_text().splitlines()  # the message answered, without the template
    assert len(shown) == 5 and all(re.fullmatch(r"'Say (\w+)' -> '\1'", line) for line in shown), shown


def random_lora(model, seed=0):
    """A LoRA adapter with random (non-zero) updates, as if trained."""
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def test_peft_loads_a_fournil_adapter_and_fournil_loads_peft_s(bpe_base, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root, base = bpe_base
    CLI(root)("convert", base, tmp_path / "hf")
    run = Run.load(base, "cpu")
    model = random_lora(run.model)
    save_adapter(model, LoraConfig(rank=4, alpha=8), tmp_path / "adapter", str(base))
    x = torch.randint(run.tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        ours = model(x)
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), tmp_path / "adapter").eval()
        assert torch.allclose(hf(x).logits, ours, atol=1e-4)
        assert not torch.allclose(Run.load(base, "cpu").model(x), ours, atol=1e-3)  # the adapter does change the model
        assert torch.allclose(merge_lora(model)(x), ours, atol=1e-4)

        # the other way: an adapter PEFT made
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                    PeftLoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0, 0.05)
        peft_model.save_pretrained(tmp_path / "made-by-peft")
        theirs = Run.load(base, "cpu").model
        load_adapter(theirs, tmp_path / "made-by-peft")
        assert torch.allclose(theirs.eval()(x), peft_model.eval()(x).logits, atol=1e-4)

    CLI(root)("merge", base, tmp_path / "made-by-peft", tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(Run.load(tmp_path / "merged", "cpu").model(x), theirs(x), atol=1e-4)


def test_instruction_files_in_each_usual_form_read_as_the_same_conversation(tmp_path):
    said = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"}]
    forms = {
        "chat": {"messages": said},
        "sharegpt": {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                        "value": m["content"]} for m in said]},
        "prompt-completion": {"prompt": said[:-1], "completion": said[-1:]},
    }
    for name, record in forms.items():
        assert read_conversations(str(write_jsonl(tmp_path / f"{name}.jsonl", [record]))) == [said], name
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, record in forms.items():  # Parquet, as the Hub stores datasets
        pq.write_table(pa.Table.from_pylist([record] * 2), tmp_path / f"{name}.parquet")
        assert read_conversations(str(tmp_path / f"{name}.parquet")) == [said] * 2, name
    one_turn = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    for record in ({"prompt": "2+2?", "completion": "4"}, {"instruction": "2+2?", "output": "4"},
                   {"instruction": "2+2?", "context": "", "response": "4", "category": "open_qa"},  # Dolly's
                   {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}):
        assert read_conversations(str(write_jsonl(tmp_path / "one.jsonl", [record]))) == [one_turn], record

    for record in ({"question": "2+2?", "answer": "4"}, {"question": "2+2?", "answer": "4", "id": 7}):  # GSM8K's
        assert read_conversations(str(write_jsonl(tmp_path / "one.jsonl", [record]))) == [one_turn], record
    assert read_conversations("gsm8k_train")[0][0]["content"].startswith("Natalia sold clips to 48 of her friends")

    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"query": "2+2?", "answer": "4"}])  # (it named only what Alpaca needs)
    with pytest.raises(FournilError, match=r"line 1: missing 'instruction' and 'output' \(it has 'query', 'answer'; "
                                           r"an example has .* or 'conversations' \(ShareGPT\); or 'prompt' and "
                                           r"'completion'; or 'question' and 'answer' \(GSM8K\), as texts\)$"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"instruction": "Sum them.", "context": "2 and 2", "response": "4"}])  # Dolly's input too
    assert read_conversations(str(bad)) == [[{"role": "user", "content": "Sum them.\n\n2 and 2"},
                                             {"role": "assistant", "content": "4"}]]
    write_jsonl(bad, [{"question": "Who?", "answer": {"text": ["Ada"], "start": [0]}}])  # (SQuAD's: not a text)
    with pytest.raises(FournilError, match="missing 'instruction' and 'output' \\(it has 'question', 'answer'; "):
        read_conversations(str(bad))
    write_jsonl(bad, [{"text": "To be, or not to be"}])
    with pytest.raises(FournilError, match=r"\(it has 'text'; .*\); this file holds documents: learn from them with "
                                           r"fournil train \(or fournil prepare\)$"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}])
    with pytest.raises(FournilError, match=r"line 1: 'conversations' must be a list of \{'from': system\|human\|gpt"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"prompt": "2+2?", "completion": [{"role": "assistant"}]}])
    with pytest.raises(FournilError, match=r"line 1: 'completion' must be a list of \{'role'"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"messages": [said[1], {**said[2], "weight": 2}]}])
    with pytest.raises(FournilError, match=r"line 1: a message's 'weight' is 0 \(shown, not learned\) or 1, not 2$"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"messages": [said[1], {**said[2], "weight": 0}]}])
    with pytest.raises(FournilError, match="line 1: every answer has weight 0: there is nothing to learn in it"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"prompt": said[:2], "completion": said[1:2]}])
    with pytest.raises(FournilError, match="must end with an assistant message"):
        read_conversations(str(bad))


def test_bad_instruction_data_and_adapters_say_what_is_wrong(bpe_base, tmp_path, trained):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', encoding="utf-8")
    with pytest.raises(FournilError, match="line 2: not valid JSON"):
        read_conversations(str(bad))
    bad.write_text("To be, or not to be\n", encoding="utf-8")  # (it said "line 1: not valid JSON (Expecting value)")
    with pytest.raises(FournilError, match=r"holds text, not JSON records \(line 1: 'To be, or not to be'\): train "
                                           r"on text with `fournil train --data "):
        read_conversations(str(bad))
    (tmp_path / "one.json").write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    with pytest.raises(FournilError, match=r"one.json holds one JSON object \(keys: data\), not records: give a JSON "
                                           r"array of objects, or one object per line \(.jsonl\)$"):  # (it said
        read_conversations(str(tmp_path / "one.json"))  # "line 1: not valid JSON", of a file that is valid JSON)
    bad.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-16")  # (Notepad's "Unicode")
    with pytest.raises(FournilError, match="is UTF-16 text"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(FournilError, match="line 2: missing 'output'"):
        read_conversations(str(bad))
    with pytest.raises(FournilError, match="holds preference pairs: learn from them with fournil align"):
        read_conversations(str(data_path("hh_rlhf_harmless", BUNDLED_PREFERENCES, "preference")))  # (it said only
        # what an instruction needs)
    with pytest.raises(FournilError, match="the bundled rasbt_preferences holds preference pairs, not instruction "
                                           "examples: learn from it with fournil align"):
        read_conversations("rasbt_preferences")  # (it said there was none by that name)
    write_jsonl(bad, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(FournilError, match="must end with an assistant message"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"instruction": "a", "output": "b"}, {"instruction": 5, "output": "b"}])  # (not "missing")
    with pytest.raises(FournilError, match="line 2: 'instruction' must be a text, not 5"):
        read_conversations(str(bad))
    write_jsonl(bad, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b\ud83d"}])  # (ensure_ascii)
    with pytest.raises(FournilError, match=r"line 2: output holds half of a UTF-16 surrogate pair .* write the char"):
        read_conversations(str(bad))
    bad.write_text("[1, 2]\n[3]\n", encoding="utf-8")  # lines of arrays: JSONL all the same, by its name
    with pytest.raises(FournilError, match="bad.jsonl, line 1: expected a JSON object, got list"):
        read_conversations(str(bad))
    bad.write_text('\ufeff{"instruction": "a", "output": "b"}\n', encoding="utf-8")  # a BOM, as some editors write
    assert read_conversations(str(bad)) == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    root, base = bpe_base
    long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "Say it", "output": "word " * n} for n in (1, 2, 3, 400, 500)])
    result = CLI(root)("finetune", base, "--data", long, "--steps", "2", "--max-length", "2000", "--quiet", check=False)
    assert result.returncode == 2 and "--max-length 2000 is longer than the model's context of 1024" in result.stderr
    result = CLI(root)("finetune", base, "--data", long, "--steps", "2", "--max-length", "100", "--quiet", "--out", "long")
    assert re.search(r"skipped 2 of 5 examples longer than 100 tokens \(the longest: \d{3,4}\); to keep them, raise "
                     r"--max-length, up to the model's context, or take a model with a longer context", result.stdout)
    for command in (["finetune"], ["align"], ["reward", "train"]):  # a character model: they all read conversations
        result = CLI(root)(*command, trained["gpt"], "--steps", "2", "--quiet", check=False)
        assert result.returncode == 2 and result.stderr.startswith("fournil: error: instructions and preferences are "
                                                                   "read as conversations, and a character tokenizer")

    result = CLI(root)("finetune", trained["ngram"], "--steps", "2", check=False)  # (a traceback with a BPE)
    assert result.stderr.startswith("fournil: error: tuning on instructions follows gradients, and an ngram model is a "
                                    "table of counts"), result.stderr
    with pytest.raises(FournilError, match=r"^LoRA adapts linear layers, and this rnn model has none but its output "
                                           r"layer: tune every weight \(leave --lora out\)$"):  # (nothing trained)
        add_lora(Run.load(trained["rnn"], "cpu").model, LoraConfig())
    other = Run.load(base, "cpu")
    save_adapter(random_lora(other.model), LoraConfig(rank=4, alpha=8), tmp_path / "adapter", "base")
    gpt = Run.load(trained["gpt"], "cpu").model
    with pytest.raises(FournilError, match="made for another model"):
        load_adapter(gpt, tmp_path / "adapter")


def test_packing_keeps_every_answer_and_a_lora_run_resumes(bpe_base, tmp_path):
    root, base = bpe_base
    tok = Run.load(base, "cpu").tokenizer
    examples = [render_example(tok, [{"role": "user", "content": f"Count to {n}"},
                                     {"role": "assistant", "content": " ".join(map(str, range(n)))}]) for n in range(1, 9)]
    rows = pack(examples, 60)
    assert len(rows) < len(examples) and all(len(ids) <= 60 for ids, _ in rows)
    assert [t for ids, _ in rows for t in ids] == [t for ids, _ in examples for t in ids]
    assert [m for _, ms in rows for m in ms] == [m for _, ms in examples for m in ms]

    cli = CLI(root)
    cli("finetune", base, "--lora", "--lora-rank", "2", "--pack", "--steps", "4", "--eval-every", "2", "--quiet", "--out", "tuned")
    said = cli("finetune", "--resume", root / "tuned", "--steps", "8", "--quiet").stdout
    assert "; 8 steps (from step 4), batch 8" in said
    steps = [json.loads(line)["step"] for line in (root / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6, 8]  # the base model's val NLL, then every second step, resumed at step 4
    shown = cli("eval", root / "tuned").stdout
    assert "val" in shown and "test" in shown
    # a LoRA run names its base: merged without naming it again (both were required before)
    said = cli("merge", root / "tuned", root / "merged").stdout
    assert said.strip() == f"merged a rank-2 adapter on 7 kinds of layers into {base} -> {root / 'merged'}"
    tuned = Run.load(root / "tuned", "cpu").model.state_dict()
    merged = Run.load(root / "merged", "cpu").model.state_dict()
    assert tuned.keys() == merged.keys() and all(torch.equal(tuned[k], merged[k]) for k in tuned)
    # info says whose dtype and size it gives (the base's dtype beside the adapter's size, unsaid, before)
    info = Run.load(root / "tuned", "cpu").info()
    assert info["stored dtype"] == "float32 (the base; the adapter: float32)"
    files = ("adapter_model.safetensors", "adapter_config.json", "config.json", "tokenizer.json",
             "tokenizer_config.json")  # the model's files: not its loss.png
    kib = sum((root / "tuned" / name).stat().st_size for name in files) / 1024
    assert info["size on disk"] == f"{kib:.1f} KiB (the adapter; the base: {base})"


def test_an_adapting_run_validates_a_quarter_of_its_steps_apart_unless_told(bpe_base):
    root, base = bpe_base
    for out, told, validated in (("quarters", [], [0, 10, 20]), ("told", ["--eval-every", "20"], [0, 20])):
        CLI(root)("finetune", base, "--lora", "--steps", "20", *told, "--quiet", "--out", out)  # (20 was 10 before)
        records = map(json.loads, (root / out / "metrics.jsonl").read_text().splitlines())
        assert [r["step"] for r in records if "val_loss" in r] == validated


def test_memory_is_saved_for_the_batches_that_need_it():
    """``--low-memory auto`` decides for each batch from its padded width: for SmolLM2's layers in bf16, 1 GiB of
    activations is 1,827 tokens, so DPO's usual 8 pairs of 79 tokens train whole, where the longest answers
    allowed (512 tokens) are read in passes and their layers recomputed."""
    from fournil.models.llama import LlamaConfig
    from fournil.device import activation_budget, memory_budget, memory_size
    from fournil.train.trainer import activation_bytes, batch_passes

    smollm2 = LlamaConfig(n_layer=30, n_embd=576, n_head=9, n_kv_head=3)
    above = 2**30 / activation_bytes(smollm2, 1, torch.bfloat16)
    assert int(above) == 1827
    assert batch_passes(8, 2, 79, above) == (False, 8)  # rasbt_preferences, its mean width
    assert batch_passes(8, 1, 228, above) == (False, 8)
    assert batch_passes(8, 1, 229, above) == (True, 4)
    assert batch_passes(8, 1, 512, above) == (True, 2)
    assert batch_passes(8, 2, 512, above) == (True, 1)
    assert batch_passes(8, 2, 79, 2**30 / activation_bytes(smollm2, 1, torch.float32)) == (True, 6)  # fp32: 913
    # the GiB is the least: a CPU gives an eighth of its memory (generation keeps to the GiB, where more gains little)
    cpu = torch.device("cpu")
    assert activation_budget(cpu) == max(memory_budget(cpu), memory_size(cpu) // 8) and memory_budget(cpu) == 2**30


@pytest.mark.parametrize("command", ["finetune", "align"])
def test_low_memory_trains_exactly_as_whole_batches(bpe_base, command):
    """Layers recomputed in the backward pass and each batch of 8 read in passes of at most 1,024 tokens (here 7
    examples then 1, or 3 or 4 pairs at a time, weighted by their share of the targets or pairs): the losses and the
    adapter of whole batches, to fp32 rounding."""
    from safetensors.torch import load_file

    root, base = bpe_base
    runs, said = {}, {}
    for how in ("on", "off"):
        said[how] = CLI(root)(command, base, "--lora", "--lora-dropout", "0", "--steps", "3", "--eval-every", "3",
                              "--low-memory", how, "--dtype", "float32", "--quiet", "--out", f"{command}-{how}").stdout
        runs[how] = root / f"{command}-{how}"
    assert "low memory (layers recomputed, passes of at most 1,024 tokens)" in said["on"]
    assert "low memory" not in said["off"]
    logged = {how: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
              for how, run in runs.items()}
    trained = {how: [r["train_loss"] for r in rows if "train_loss" in r] for how, rows in logged.items()}
    assert trained["on"] == pytest.approx(trained["off"], abs=1e-5)
    assert logged["on"][-1]["val_loss"] == pytest.approx(logged["off"][-1]["val_loss"], abs=1e-5)
    adapters = {how: load_file(run / "adapter_model.safetensors") for how, run in runs.items()}
    for name, weight in adapters["on"].items():
        assert torch.allclose(weight, adapters["off"][name], atol=1e-5), name


def test_a_recipe_s_split_and_seed_reach_the_examples(bpe_base):
    root, base = bpe_base
    (root / "split.toml").write_text(f'[finetune]\nbase = "{base}"\n[data]\nsplit = [0.8, 0.1, 0.1]\nseed = 7\n'
                                     f'[train]\nsteps = 1\n')
    said = CLI(root)("finetune", "--config", root / "split.toml", "--quiet", "--out", "split").stdout
    # the recipe names no data: finetune's own, rasbt_instructions, split as it says (it was split 90/5/5, by seed
    # 1337, without a word; and a recipe without data got prenoms, refused as text)
    assert said.startswith("fine-tuning ") and " on rasbt_instructions: 880 examples; " in said.splitlines()[0]
    data = json.loads((root / "split" / "config.json").read_text())["data"]
    assert (data["data"], data["split"], data["seed"]) == ("rasbt_instructions", [0.8, 0.1, 0.1], 7)
    (root / "files.toml").write_text(f'[finetune]\nbase = "{base}"\n[data]\ntrain = "a.jsonl"\n')
    refused = CLI(root)("finetune", "--config", root / "files.toml", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        "fournil finetune splits one data set (split, seed): give it as data, not train")


def test_the_python_api_fine_tunes_aligns_and_distils(bpe_base, tmp_path):
    """`fournil.finetune` and `fournil.distill`, as the commands run them (they were importable only from inside)."""
    import fournil

    _, base = bpe_base
    said, two = [], fournil.TrainConfig(steps=2, samples=0)
    quiet = {"progress": False, "announce": said.append}
    tuned = fournil.finetune(base, "rasbt_instructions", lora=fournil.LoraConfig(rank=2), train=two,
                             out=str(tmp_path / "lora"), **quiet)
    assert tuned.config.finetune.lora.rank == 2 and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert tuned.chat("Hi", temperature=0, max_new_tokens=4) == Run.load(tmp_path / "lora", "cpu").chat(
        "Hi", temperature=0, max_new_tokens=4)  # what it returns is the run it saved
    aligned = fournil.finetune(base, "rasbt_preferences", align=fournil.AlignConfig(beta=0.2), train=two,
                               out=str(tmp_path / "dpo"), **quiet)
    assert aligned.config.align.method == "dpo" and aligned.config.align.beta == 0.2
    student = fournil.distill(base, "layers:1", train=two, baseline=False, out=tmp_path / "student", **quiet)  # (a
    # Path teacher failed as config.json was written)
    assert student.model.config.n_layer == 1 and (tmp_path / "student" / "report.md").is_file()
    with pytest.raises(FournilError, match="--lora-rank must be at least 1"):
        fournil.finetune(base, lora=fournil.LoraConfig(rank=0), out=str(tmp_path / "no"), **quiet)


def test_a_run_finds_the_model_it_started_from_wherever_it_is_read(bpe_base, tmp_path):
    """A LoRA run of `runs/base`-like relative paths recorded them as given: read from another folder, it looked for
    its base there ("no run directory or model 'base'"). The base, a teacher and a reward file are recorded whole."""
    shutil.copytree(bpe_base[1], tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    here, there = CLI(tmp_path), CLI(tmp_path / "elsewhere")
    here("finetune", "base", "--lora", "--steps", "1", "--quiet", "--out", "tuned")
    here("distill", "--teacher", "base", "--student", "layers:1", "--steps", "1", "--no-baseline", "--quiet", "--out",
         "student")
    (tmp_path / "short.py").write_text("def short(prompts, answers):\n    return [-len(a) for a in answers]\n")
    here("align", "base", "--method", "grpo", "--reward", "short.py:short", "--steps", "1", "--quiet", "--out", "g")
    recorded = {run: json.loads((tmp_path / run / "config.json").read_text()) for run in ("tuned", "student", "g")}
    assert recorded["tuned"]["finetune"]["base"] == recorded["student"]["distill"]["teacher"] == str(tmp_path / "base")
    assert recorded["g"]["align"]["reward"] == f"{tmp_path / 'short.py'}:short"
    assert f"LoRA adapter on {tmp_path / 'base'}" in there("info", tmp_path / "tuned").stdout
    there("align", "--resume", tmp_path / "g", "--steps", "2", "--quiet")
    shutil.move(tmp_path / "base", tmp_path / "moved")
    refused = there("info", tmp_path / "tuned", check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"fournil: error: {tmp_path / 'tuned'} is an adapter on {tmp_path / 'base'}, which is not there any more: give "
        f"the base where it is now, fournil merge BASE {tmp_path / 'tuned'} OUT")
    there("merge", tmp_path / "moved", tmp_path / "tuned", tmp_path / "merged")
