"""Distillation: the KD loss by hand, a student learning a teacher made here, sequence-level answers, the report."""
import json
import re

import pytest
import torch
from conftest import CLI, InProcess

from fournil.config import DataConfig, DistillConfig, RunConfig
from fournil.generate import SamplingParams, complete
from fournil.runs import Run
from fournil.train.distill import ANSWERS, distill_data, teacher_layers
from fournil.train.objectives import Distillation, distillation_loss


def test_distillation_loss_is_the_hand_computed_value_at_a_temperature():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    # at T = 2 the teacher is softmax(1, 0) = (e, 1) / (e + 1) and the student uniform:
    # T^2 * sum t log(t / s) = 4 * 0.110944 and, reverse, T^2 * sum s log(s / t) = 4 * 0.120115
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(0.4437763, abs=1e-6)
    assert distillation_loss(student, teacher, 2.0, reverse=True).item() == pytest.approx(0.4804580, abs=1e-6)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("reverse", [False, True])
def test_distillation_loss_and_its_written_out_gradient_are_autograds_through_the_formula(reverse, monkeypatch):
    """The loss computed in chunks, with its gradient written out, equals the formula's value and autograd's gradient
    through it in fp64: in fp32 to fp32's rounding, in bf16 logits to bf16's."""
    import fournil.models.base

    monkeypatch.setattr(fournil.models.base, "LOGITS_BUDGET", 7 * 50)  # chunks of 7 positions, the last of 2
    torch.manual_seed(0)
    for dtype, tolerance in [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -7)]:
        student = (torch.randn(30, 50) * 3).to(dtype).requires_grad_()
        teacher = (torch.randn(30, 50) * 3).to(dtype)
        (distillation_loss(student, teacher, 2.0, reverse) * 1.7).backward()
        exact = student.detach().double().requires_grad_()
        s, t = (exact / 2.0).log_softmax(-1), (teacher.double() / 2.0).log_softmax(-1)
        kl = ((s.exp() * (s - t)).sum() if reverse else (t.exp() * (t - s)).sum()) / 30 * 2.0**2
        (kl * 1.7).backward()
        assert distillation_loss(student, teacher, 2.0, reverse).item() == pytest.approx(kl.item(), rel=1e-6)
        assert (student.grad.double() - exact.grad).abs().max() <= tolerance * exact.grad.abs().max()


def test_a_student_learns_from_a_teacher_and_the_report_compares_them(bpe_llama, tmp_path):
    teacher = Run.load(bpe_llama, "cpu").model
    settings, weights = teacher_layers(teacher, 1)  # layers:1 keeps the last layer, and the embeddings
    assert settings["n_layer"] == 1 and torch.equal(weights["model.layers.0.mlp.up_proj.weight"],
                                                     teacher.state_dict()["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(weights["model.embed_tokens.weight"], teacher.state_dict()["model.embed_tokens.weight"])
    small = {"family": "llama", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1}
    (tmp_path / "small.json").write_text(json.dumps(small), encoding="utf-8")
    CLI(tmp_path)("distill", "--teacher", bpe_llama, "--student", tmp_path / "small.json", "--context", "64", "--steps",
                  "30", "--eval-every", "10", "--lr", "1e-2", "--kd-weight", "1", "--quiet", "--out", "student")
    logged = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    report = (tmp_path / "student" / "report.md").read_text(encoding="utf-8").splitlines()
    rows = {line.split("|")[1].strip(): line for line in report[2:]}
    # imitation alone (alpha 1) brings it closer to the teacher, in what it predicts and in how well it predicts
    assert logged[-1]["train_kd"] < 0.5 * logged[0]["train_kd"]
    assert Distillation.curves[:2] == ("train_nll", "val_loss") and "train_nll" in logged[-1]  # loss.png: NLL and NLL
    teacher_nll = float(rows["teacher"].split("|")[5])
    assert abs(logged[-1]["val_loss"] - teacher_nll) < abs(logged[0]["val_loss"] - teacher_nll)
    assert set(rows) == {"teacher", "distilled student", "student without teacher"}
    assert "(1.00x)" in rows["teacher"] and "float32" in rows["distilled student"]
    baseline = [json.loads(line) for line in (tmp_path / "student" / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert "train_kd" not in baseline[-1] and baseline[-1]["step"] == 30  # same steps, no teacher
    student = Run.load(tmp_path / "student", "cpu")
    assert student.model.config.n_embd == 32 and student.model.num_params() < teacher.num_params()
    # each student's val NLL, as its training measured it, is that of the weights it kept, measured again
    for name, folder in [("distilled student", "student"), ("student without teacher", "student/baseline")]:
        run = Run.load(tmp_path / folder, "cpu")
        again = run.evaluate(("val",), max_tokens=run.config.train.eval_tokens)["val"]["nll"]
        assert float(rows[name].split("|")[5]) == pytest.approx(again, abs=1e-4), name


def test_sequence_level_distillation_learns_the_teachers_own_answers(bpe_llama, tmp_path):
    CLI(tmp_path)("distill", "--teacher", bpe_llama, "--data", "rasbt_instructions", "--sequences", "4", "--context",
                  "400", "--student", "layers:1", "--steps", "4", "--no-baseline", "--quiet", "--out", "seq")
    rows = [json.loads(line) for line in (tmp_path / "seq" / ANSWERS).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    teacher = Run.load(bpe_llama, "cpu")
    done = complete(teacher.model, teacher.tokenizer, [teacher.tokenizer.encode(rows[0]["prompt"])],
                    SamplingParams(256, temperature=0), teacher.dtype)
    assert done[0].text == rows[0]["answer"]  # the teacher's greedy answer, through the engine
    resumed = CLI(tmp_path)("distill", "--resume", "seq", "--steps", "5", "--quiet").stdout
    assert "5 steps (from step 4)" in resumed  # and --no-baseline kept (it trained a baseline on resuming before)
    assert "without the teacher" not in resumed and not (tmp_path / "seq" / "baseline").exists()
    said = []  # examples longer than the context are skipped, and distill's flag named (it said finetune's)
    distill_data(RunConfig({}, DataConfig("rasbt_instructions"), distill=DistillConfig(bpe_llama, context=40)),
                 teacher.tokenizer, said.append)
    assert re.fullmatch(r"skipped [\d,]+ of [\d,]+ examples longer than 40 tokens \(the longest: \d+\); to keep them, "
                        r"raise --context, up to the model's context, or take a model with a longer context", said[0])


def test_students_that_cannot_learn_from_the_teacher_are_refused(bpe_llama, running_text, trained, tmp_path):
    cli = CLI(tmp_path)
    (tmp_path / "wide.json").write_text(json.dumps({"family": "llama", "vocab_size": 999, "n_layer": 1}), encoding="utf-8")
    (tmp_path / "typed.json").write_text(json.dumps({"family": "llama", "n_layer": "2"}), encoding="utf-8")
    (tmp_path / "text.json").write_text("n_layer = 2", encoding="utf-8")
    (tmp_path / "huge.json").write_text(json.dumps({"n_embd": 65536, "n_head": 8}), encoding="utf-8")
    (tmp_path / "s2s.json").write_text(json.dumps({"family": "seq2seq", "n_layer": 1}), encoding="utf-8")
    failures = {
        ("--student", trained["gpt"]): "another tokenizer than the teacher",
        ("--student", str(tmp_path / "wide.json")): "a vocabulary of 999 tokens and the teacher 400",
        ("--student", "layers:9"): "a student keeps 1 of the teacher's 2 layers: give --student layers:1, say",
        ("--student", "layers:two"): "--student layers:two: layers:N takes a whole number of the teacher's layers",
        ("--student", str(tmp_path / "typed.json")): "model llama setting n_layer = '2': expected a whole number",
        ("--student", str(tmp_path / "text.json")): "text.json is not JSON (Expecting value",
        ("--student", str(tmp_path / "huge.json")): "a llama model of 180,432,207,872 parameters needs at least",
        ("--student", str(tmp_path / "s2s.json")): "a distilled student needs a decoder-only language model",
        ("--kd-weight", "2"): "--kd-weight must be in [0, 1] (got 2)",
        ("--kd-temperature", "0"): "--kd-temperature must be above 0 (got 0)",
        ("--kd-weight", "0"): "--kd-weight 0 leaves the teacher out",  # (a baseline called distilled, and no baseline)
        ("--kd-weight", "0", "--sequences", "3", "--reverse"):
            "--reverse shapes the distillation loss, which --kd-weight",
        ("--sequences", "3"): "--sequences needs an instruction set",
    }
    for args, message in failures.items():
        result = cli("distill", "--teacher", bpe_llama, *args, "--steps", "1", "--context", "32", check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    result = cli("distill", "--teacher", bpe_llama, "--data", "prenoms", "--context", "4", "--steps", "1", check=False)
    told = re.search(r"the train split has a document of (\d+) tokens, longer than the model's context of 4 \(a "
                     r"document reads its start too\); raise --context to at least (\d+)$", result.stderr.strip())
    assert result.returncode == 2 and told and int(told[2]) == int(told[1]) + 1, result.stderr  # (--block-size before)
    result = cli("distill", "--teacher", running_text, "--steps", "1", check=False)  # (a teacher of one layer)
    assert result.returncode == 2 and "layers:1: the teacher has one layer, none to leave out: give --student a " \
        "model config .json" in result.stderr
    result = cli("distill", "--teacher", trained["rnn"], "--student", "layers:1", "--steps", "1", check=False)
    assert result.returncode == 2 and "layers:1 keeps some of a transformer's layers (gpt, llama), and the teacher " \
        "is rnn" in result.stderr


def test_a_counted_model_teaches_and_is_not_taught(trained, tmp_path, capsys, monkeypatch):
    """An ngram teacher's distributions teach a student (its report was a traceback: the teacher has no parameters to
    read a precision from); an ngram student, which is counted, is refused (it said it had no counts yet)."""
    cli = InProcess(capsys, monkeypatch, tmp_path)  # (no start-up for each)
    (tmp_path / "gpt.json").write_text(json.dumps({"family": "gpt", "n_layer": 1, "n_embd": 16, "n_head": 2}))
    (tmp_path / "ngram.json").write_text(json.dumps({"family": "ngram"}))
    taught = cli("distill", "--teacher", trained["ngram"], "--student", "gpt.json", "--steps", "1", "--no-baseline",
                 "--quiet", "--out", "student")
    assert taught.returncode == 0, taught.stderr
    rows = (tmp_path / "student" / "report.md").read_text(encoding="utf-8").splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["teacher", "distilled student"]
    refused = cli("distill", "--teacher", trained["gpt"], "--student", "ngram.json", "--steps", "1")
    assert refused.returncode == 2 and refused.stderr.startswith("fournil: error: an ngram student is counted, not "
                                                                 "taught"), refused.stderr


def test_a_names_model_is_distilled_on_its_own_names_by_default(trained, tmp_path):
    """Given no --data nor --context, the student learns the teacher run's data (names, one per line, in its split)
    with rows of the teacher's context; the report decodes each model from nothing (a names model knows no "Once").
    Given no --student, it keeps half of the teacher's 2 layers (layers:4, SmolLM2's default, was refused)."""
    shown = CLI(tmp_path)("distill", "--teacher", trained["gpt"], "--steps", "2", "--out", "small").stderr
    logged = json.loads((tmp_path / "small" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    # the student's NLL beside its val NLL (it showed the mixed objective, as "loss"), then the baseline's own loss
    student, baseline = re.findall(r"step 2, (\w+) ([\d.]+), val ([\d.]+)", shown)
    assert student == ("nll", f"{logged['train_nll']:.4f}", f"{logged['val_loss']:.4f}") and baseline[0] == "loss"
    config = json.loads((tmp_path / "small" / "config.json").read_text(encoding="utf-8"))
    teacher = json.loads((trained["gpt"] / "config.json").read_text(encoding="utf-8"))
    assert config["data"] == {**teacher["data"], "tokenizer": "teacher"} and config["data"]["mode"] == "lines"
    assert config["distill"]["context"] == teacher["model"]["block_size"] < 256
    assert config["distill"]["student"] == "layers:1" and config["model"]["n_layer"] == 1
    header, _, *rows = (tmp_path / "small" / "report.md").read_text(encoding="utf-8").splitlines()
    assert [row.split("|")[1].strip() for row in rows] == ["teacher", "distilled student", "student without teacher"]
    assert header.split("|")[4].strip() == "decode tokens/s (float32)"  # (a run's weights, as generation loads them)
    assert all(float(row.split("|")[4].split()[0]) > 0 for row in rows)


def test_the_report_decodes_every_model_in_the_bits_of_a_quantized_teacher(cli, tmp_path):
    """A Q8_0 teacher generates in int8 on a CPU: the report decodes the students in int8 too, like with like (in
    fp32 they had 3.3 times the speed of SmolLM2 in fp32, but less than SmolLM2 has in the int4 a user gets)."""
    cli("train", "--data", "shakespeare", "--model", "llama", "--tokenizer", "bpe:300", "--n-embd", "64", "--n-layer",
        "2", "--block-size", "64", "--batch-size", "2", "--steps", "2", "--quiet", "--out", "run")
    cli("convert", "run", "q8_0.gguf", "--type", "q8_0")  # (64 wide: its matrices in whole blocks of 32)
    cli("distill", "--teacher", "q8_0.gguf", "--student", "layers:1", "--steps", "2", "--context", "32", "--quiet",
        "--out", "small")
    header, _, *rows = (tmp_path / "small" / "report.md").read_text(encoding="utf-8").splitlines()
    assert header.split("|")[4].strip() == "decode tokens/s (int8)"
    assert "Q8_0 x" in rows[0] and all("MiB (float32)" in row for row in rows[1:])  # (students: fp32 on disk)
    assert all(float(row.split("|")[4].split()[0]) > 0 for row in rows)


def test_under_a_time_budget_the_student_alone_takes_as_many_steps_as_the_distilled_one(trained, tmp_path):
    """Without the teacher to read, a step is faster: given the same seconds, the student alone would take more steps
    than the distilled one, and the report would compare unequal trainings."""
    CLI(tmp_path)("distill", "--teacher", trained["gpt"], "--student", "layers:1", "--steps", "100000", "--time", "3s",
                  "--eval-every", "10", "--quiet", "--out", "timed")
    last = {}
    for run in (tmp_path / "timed", tmp_path / "timed" / "baseline"):
        last[run.name] = json.loads((run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])["step"]
    assert 0 < last["timed"] < 100000 and last["baseline"] == last["timed"], last
    config = json.loads((tmp_path / "timed" / "baseline" / "config.json").read_text(encoding="utf-8"))
    assert config["train"]["steps"] == last["timed"] and config["train"]["time"] is None
