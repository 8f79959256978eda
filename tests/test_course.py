"""The course in examples/course runs, step after step, in English and in French, with tiny budgets."""
import os
import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matplotlib.image import imread

COURSE = Path(__file__).parent.parent / "examples" / "course"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def follow(language: str, cwd: Path, chat_model: Path) -> dict[str, str]:
    """Run every step of one language in order, in ``cwd``; each step's output by file name."""
    env = {**os.environ, "COURSE_TEST": "1", "CHAT_MODEL": str(chat_model), "PORT": str(free_port()),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # one core per language: the two run side by side
    outputs = {}
    for step in sorted((COURSE / language).glob("*.sh")):
        done = subprocess.run(["bash", str(step)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{language}/{step.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs[step.name] = done.stdout + done.stderr
    return outputs


def test_every_step_of_the_course_runs_in_both_languages(tmp_path, bpe_llama):
    english, french = sorted(p.name for p in (COURSE / "en").glob("*.sh")), sorted(p.name for p in (COURSE / "fr").glob("*.sh"))
    assert len(english) == len(french) == 10
    assert [n[:3] for n in english] == [n[:3] for n in french] == [f"{i:02d}-" for i in range(1, 11)]  # step for step
    (tmp_path / "en").mkdir()
    (tmp_path / "fr").mkdir()
    with ThreadPoolExecutor(2) as pool:  # the two languages side by side: most of a step is starting Python
        en, fr = pool.map(lambda lang: follow(lang, tmp_path / lang, bpe_llama), ["en", "fr"])

    for lang, out, folder, bigram, word, symbols in [("en", en, "course", "names-bigram", "emma", 27),
                                                     ("fr", fr, "cours", "prenoms-bigramme", "marie", 46)]:
        steps = list(out.values())
        assert f"counted {symbols * symbols:,} parameters -> runs/{folder}/{bigram}" in steps[0]
        assert re.search(rf"^\.{word[0]} 0\.\d+ ", steps[0], re.M)  # the first transition of the word, explained
        table = re.findall(r"^ ?(\d+) +([\d,]+) +([\d,]+)$", steps[1], re.M)
        assert [int(n) for n, _, _ in table] == list(range(1, 11))
        assert [int(possible.replace(",", "")) for _, possible, _ in table] == [symbols**n for n in range(1, 11)]
        seen = [int(s.replace(",", "")) for _, _, s in table]
        assert seen == sorted(seen) and seen[-1] < 10**6  # the data's contexts level off while V^n explodes
        assert "principal components explain" in steps[2] and "attends most to" in steps[3]
        assert "bytes per token" in steps[4] and "bits/byte" in steps[5]
        assert "val" in steps[6] and "reward accuracy" in steps[7].lower().replace("_", " ")
        assert "distilled student" in steps[8]
        assert re.search(r"^POST /v1/chat/completions: ", steps[9], re.M) and "POST /predict: " in steps[9]
        for png in {"en": ["emma.png", "embeddings.png", "attention-names.png", "attention-it.png", "capital.png",
                           "tokens.png"],
                    "fr": ["marie.png", "plongements.png", "attention-prenoms.png", "attention-it.png", "capitale.png",
                           "tokens.png"]}[lang]:
            assert imread(tmp_path / lang / png).ndim == 3, png
