"""The precision policy: scores in fp32 on every CPU, bf16 forcible anywhere, and answers that do not depend on what a
server served before or beside them, in fp32, bf16 and int8."""
import threading

import openai
import pytest
import torch
from conftest import Server

from fournil.device import cpu_bf16_pays
from fournil.runs import Run

pytestmark = pytest.mark.precision
BF16 = {"FOURNIL_CPU_BF16": "1"}


@pytest.fixture
def forced(monkeypatch):
    """Set FOURNIL_CPU_BF16 in this process (``forced("1")``), as if the CPU had bf16 units, or had none."""
    def force(value: str):
        monkeypatch.setenv("FOURNIL_CPU_BF16", value)
        cpu_bf16_pays.cache_clear()
    yield force
    cpu_bf16_pays.cache_clear()


def test_scores_are_fp32_on_every_cpu_unless_asked(trained, forced):
    scores = {}
    for value in ("1", "0"):
        forced(value)
        run = Run.load(trained["gpt"], "cpu")
        assert run.dtype == torch.float32  # generation on a CPU: the weights' precision, never cast at every token
        assert run.measure_dtype == torch.float32
        scores[value] = run.evaluate()
        assert run.explain("emma")["nll"] == pytest.approx(Run.load(trained["gpt"], "cpu", "float32").explain("emma")["nll"],
                                                           abs=1e-5)
    for split in ("val", "test"):
        assert scores["1"][split]["nll"] == pytest.approx(scores["0"][split]["nll"], abs=1e-5)
    asked = Run.load(trained["gpt"], "cpu", "bfloat16")
    assert asked.measure_dtype == torch.bfloat16  # --dtype bfloat16: the scores too, as asked
    assert asked.evaluate()["val"]["nll"] == pytest.approx(scores["0"]["val"]["nll"], rel=1e-2)


def test_training_in_bf16_validates_in_fp32_and_says_so(cli):
    trained = cli("train", "--data", "names", "--model", "gpt", "--n-embd", "32", "--n-layer", "2", "--steps", "20",
                  "--eval-every", "10", "--quiet", "--out", "r", env=BF16).stdout
    assert "cpu bfloat16, scores float32" in trained
    best = float(trained.split("best val NLL ")[1].split()[0])
    for value in ("1", "0"):  # the best checkpoint's val NLL, as `eval` gives it on either kind of CPU
        shown = cli("eval", "r", env={"FOURNIL_CPU_BF16": value}).stdout
        assert "scored in float32 on cpu" in shown
        val = next(line.split() for line in shown.splitlines() if line.startswith("val "))
        assert float(val[2]) == pytest.approx(best, abs=1e-4)
    assert "scored in bfloat16 on cpu" in cli("eval", "r", "--dtype", "bfloat16").stdout


def test_a_narrow_model_trains_in_fp32_on_every_cpu_and_the_width_that_decides_is_the_language_models(cli, trained,
                                                                                                        monkeypatch):
    """bf16 pays on a CPU only for products wide enough (:func:`cpu_bf16_pays`): even with AMX, a 64-wide model
    trained at half its fp32 speed in bf16. Unless FOURNIL_CPU_BF16 says otherwise, a 32-wide one computes in fp32
    whatever the CPU."""
    from fournil.device import model_width
    from fournil.models.reward import RewardModel

    monkeypatch.delenv("FOURNIL_CPU_BF16", raising=False)
    cpu_bf16_pays.cache_clear()
    try:
        assert not cpu_bf16_pays(32)
    finally:
        cpu_bf16_pays.cache_clear()
    out = cli("train", "--data", "names", "--model", "gpt", "--n-embd", "32", "--n-layer", "1", "--steps", "1",
              "--quiet", "--out", "r").stdout
    assert "; cpu float32;" in out
    lm = Run.load(trained["llama"], "cpu").model
    assert model_width(lm) == model_width(RewardModel(lm)) == lm.config.n_embd
    assert model_width(Run.load(trained["ngram"], "cpu").model) is None


def test_a_wrong_FOURNIL_CPU_BF16_is_refused_in_one_line(cli):
    result = cli("train", "--data", "names", "--steps", "1", "--out", "r", check=False, env={"FOURNIL_CPU_BF16": "yes"})
    assert result.returncode == 2 and result.stderr.strip() == (
        "fournil: error: FOURNIL_CPU_BF16='yes': set it to 1 (compute in bf16 on this CPU), 0 (never), or unset it")


SERVED = {"float32": "cpu float32", "bfloat16": "cpu bfloat16", "int8": "cpu bfloat16, int8 weights"}  # what it says


def ask(client, **settings) -> tuple:
    out = client.completions.create(model="chat", prompt="KING HENRY:", max_tokens=30, logprobs=1, **settings)
    return out.choices[0].text, out.choices[0].logprobs.token_logprobs


def at_once(client, prompts_tokens: list[tuple[str, int]]) -> None:
    """Other requests, sent together: they share the batch."""
    threads = [threading.Thread(target=client.completions.create,
                                kwargs={"model": "chat", "prompt": p, "max_tokens": n, "temperature": 0.8})
               for p, n in prompts_tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


@pytest.mark.parametrize("precision", SERVED)
def test_a_server_gives_one_answer_to_one_request_whatever_it_served_before(bpe_llama, precision):
    server = Server(bpe_llama, "--dtype", precision)
    try:
        assert f"; {SERVED[precision]}) on http://127.0.0.1" in server.printed
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        answers = []
        for k in range(3):
            at_once(client, [("ROMEO " * (k + 1), 20), ("To be, or not to be, " * (5 * k + 1), 40)])
            answers.append((ask(client, temperature=0), ask(client, temperature=0.9, seed=5)))
        assert answers[0] == answers[1] == answers[2]  # texts and log-probabilities, to the last bit
    finally:
        server.stop()


def test_a_batch_invariant_server_answers_each_request_as_if_it_were_alone(bpe_llama):
    server = Server(bpe_llama, "--batch-invariant", "--dtype", "bfloat16")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        alone = ask(client, temperature=0), ask(client, temperature=0.9, seed=5)
        got = {}
        threads = [threading.Thread(target=lambda: got.setdefault("greedy", ask(client, temperature=0))),
                   threading.Thread(target=lambda: got.setdefault("seeded", ask(client, temperature=0.9, seed=5))),
                   threading.Thread(target=at_once, args=(client, [("To be, or not to be, " * 60, 60), ("ROMEO", 80),
                                                                   ("KING", 50)]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert (got["greedy"], got["seeded"]) == alone
    finally:
        server.stop()
