"""The course runs, step after step, in English and in French, with tiny budgets: the scripts of examples/course
and the notebooks of examples/notebooks."""
import json
import os
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import ForkServer, can_fork, free_port
from matplotlib.image import imread

COURSE = Path(__file__).parent.parent / "examples" / "course"


def follow(language: str, cwd: Path, env: dict, server: ForkServer | None) -> dict[str, str]:
    """Run every step of one language in order, in ``cwd`` (each ``fournil`` command forked by ``server``, if any);
    each step's output by file name."""
    env = {**env, "PORT": str(free_port())}
    outputs = {}
    for step in sorted((COURSE / language).glob("*.sh")):
        done = subprocess.run(["bash", str(step)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                              pass_fds=[server.control.fileno()] if server else [])
        assert done.returncode == 0, f"{language}/{step.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs[step.name] = done.stdout + done.stderr
    return outputs


def test_every_step_of_the_course_runs_in_both_languages(tmp_path, bpe_llama):
    english, french = sorted(p.name for p in (COURSE / "en").glob("*.sh")), sorted(p.name for p in (COURSE / "fr").glob("*.sh"))
    assert len(english) == len(french) == 10
    assert [n[:3] for n in english] == [n[:3] for n in french] == [f"{i:02d}-" for i in range(1, 11)]  # step for step
    (tmp_path / "en").mkdir()
    (tmp_path / "fr").mkdir()
    env = {**os.environ, "COURSE_TEST": "1", "CHAT_MODEL": str(bpe_llama), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}  # one core per language: the two run side by side
    server = ForkServer(env) if can_fork() else None  # (it starts as the scripts' first step does)
    env |= server.program(tmp_path / "bin") if server else {}
    try:
        with ThreadPoolExecutor(2) as pool:
            en, fr = pool.map(lambda lang: follow(lang, tmp_path / lang, env, server), ["en", "fr"])
    finally:
        if server:
            server.close()

    for lang, out, folder, bigram, word, symbols in [("en", en, "course", "names-bigram", "emma", 27),
                                                     ("fr", fr, "cours", "prenoms-bigramme", "marie", 46)]:
        steps = list(out.values())
        assert f"counted {symbols * symbols:,} parameters -> runs/{folder}/{bigram}" in steps[0]
        assert re.search(rf"^\.{word[0]} 0\.\d+ ", steps[0], re.M)  # the first transition of the word, explained
        table = re.findall(r"^ ?(\d+) +([\d,\u202f]+) +([\d,\u202f]+)$", steps[1], re.M)  # 1,600 or 1 600
        number = lambda text: int(re.sub("[,\u202f]", "", text))  # noqa: E731
        assert [int(n) for n, _, _ in table] == list(range(1, 11))
        assert [number(possible) for _, possible, _ in table] == [symbols**n for n in range(1, 11)]
        seen = [number(s) for _, _, s in table]
        assert seen == sorted(seen) and seen[-1] < 10**6  # the data's contexts level off while V^n explodes
        assert len(re.findall(rf"^runs/{folder}/\S+ +ngram +[\d,]+ +\d\.\d{{4}} ", steps[1], re.M)) == 3  # one table
        assert "principal components explain" in steps[2] and "attends most to" in steps[3]
        assert "'71 080' -> '" in steps[3] and "the decoder's cross-attention" in steps[3]  # the encoder-decoder
        assert "bytes per token" in steps[4] and "the chat template's layout around them" in steps[4]
        assert "bits/byte" in steps[5]
        assert "val" in steps[6] and "reward accuracy" in steps[7].lower().replace("_", " ")
        assert lang == "fr" or steps[6].count("tokens of the answer (the last ends its turn)") == 2  # before, after
        assert "distilled student" in steps[8]
        assert re.search(r"^POST /v1/chat/completions: ", steps[9], re.M) and "POST /predict: " in steps[9]
        for png in {"en": ["emma.png", "embeddings.png", "ladder.png", "attention-names.png", "attention-it.png",
                           "capital.png", "cross-attention.png", "tokens.png", "chat.png", "before.png", "after.png"],
                    "fr": ["marie.png", "plongements.png", "echelle.png", "attention-prenoms.png", "attention-it.png",
                           "capitale.png", "capitale-en.png", "attention-croisee.png", "tokens.png",
                           "chat.png"]}[lang]:
            assert imread(tmp_path / lang / png).ndim == 3, png


NOTEBOOKS = COURSE.parent / "notebooks"
STARTING = threading.Lock()
# what each notebook checks of its own hand-written code against fournil's (it fails on a cell error if not)
CHECKS = {"01": "< 1e-6", "03": "atol=1e-5", "04": "atol=1e-5", "05": "< 1e-9", "06": "< 0.02", "08": "< 1e-5",
          "09": "< 1e-5", "10": "assert"}


def execute(notebook: Path, cwd: Path) -> dict:
    """Run ``notebook`` top to bottom in ``cwd`` (a kernel of its own) and return it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    with STARTING:  # a kernel picks free ports, then binds them: another started meanwhile may pick the same
        client.km = client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()  # (returns once the kernel answers)
    return client.execute()


def test_every_notebook_runs_in_both_languages(tmp_path, bpe_llama, monkeypatch):
    """Every notebook of examples/notebooks, in English and in French, executed with the course's tiny budgets; the
    figures each notebook asserts (its hand-written model against fournil's) are checked by running it."""
    import shutil

    english, french = (sorted((NOTEBOOKS / lang).glob("*.ipynb")) for lang in ("en", "fr"))
    assert [p.name[:3] for p in english] == [p.name[:3] for p in french] == [f"{i:02d}-" for i in range(1, 11)]
    for lang, notebooks in (("en", english), ("fr", french)):
        for path in notebooks:  # stored without outputs: a learner sees them by running
            assert all(not c.get("outputs") and not c.get("execution_count") for c in json.loads(path.read_text())["cells"]
                       if c["cell_type"] == "code"), path.name
    shutil.copytree(NOTEBOOKS, tmp_path / "notebooks", ignore=shutil.ignore_patterns("runs", "*.png"))
    for name, value in {"COURSE_TEST": "1", "CHAT_MODEL": str(bpe_llama), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)

    def follow(lang: str) -> list:
        folder = tmp_path / "notebooks" / lang
        return [execute(folder / path.name, folder) for path in sorted(folder.glob("*.ipynb"))]

    with ThreadPoolExecutor(2) as pool:  # the two languages side by side, one core each
        done = dict(zip(("en", "fr"), pool.map(follow, ["en", "fr"])))
    for lang, notebooks in done.items():
        for number, nb in enumerate(notebooks, 1):
            code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
            assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), (lang, number)
            assert CHECKS.get(f"{number:02d}", "") in code, (lang, number)
        images = [o for nb in notebooks for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {})]
        assert len(images) >= 6, lang  # the pictures, inline
