"""``fournil bench``: standard evaluations through lm-evaluation-harness, on bundled data, offline.

lm-eval runs the tasks (its prompts, few-shot sampling, filters and metrics); fournil's engine answers
(:mod:`fournil.evaluate.harness`). The bundled tasks live in ``evaluate/tasks`` as lm-eval YAML files whose data paths
say ``FOURNIL_DATA``; they are written out, with that path filled in, to a folder lm-eval reads (``include_path``).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from fournil.checkpoint import write_json
from fournil.errors import FournilError, NotAChatModel

RESULTS = "results.json"
TASKS = {  # short name -> lm-eval task; what each measures
    "hellaswag": ("fournil_hellaswag", "HellaSwag validation, 10,042 rows, 0-shot: acc, acc_norm"),
    "gsm8k": ("fournil_gsm8k", "GSM8K test, 1,319 problems, 5-shot from train: exact match on the number"),
    "gsm8k_chat": ("fournil_gsm8k_chat", "GSM8K test, 0-shot in the model's chat template: exact match"),
    "bpb": ("fournil_bpb_shakespeare", "bits per byte on held-out Shakespeare (the last 5 %)"),
}
DATA_FILES = ("hellaswag_val.jsonl", "gsm8k_train.jsonl", "gsm8k_test.jsonl")


def write_tasks(folder: Path) -> Path:
    """The bundled tasks, ready for lm-eval, in ``folder``: YAML with data paths filled in, their data beside."""
    from fournil.config import DataConfig
    from fournil.data.corpus import load_splits

    source = resources.files("fournil.evaluate") / "tasks"
    data = resources.files("fournil.data") / "files"
    for name in DATA_FILES:
        (folder / name).symlink_to(Path(str(data / name)))
    test = load_splits(DataConfig("shakespeare"))[0].test
    with open(folder / "shakespeare_test.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": p.strip()}) + "\n" for p in test.split("\n\n") if p.strip())
    for item in source.iterdir():
        if item.name.endswith((".yaml", ".py")):
            (folder / item.name).write_text(item.read_text(encoding="utf-8").replace("FOURNIL_DATA", str(folder)),
                                            encoding="utf-8")
    return folder


def check_yaml(folder: Path) -> None:
    """Every YAML file of ``folder`` parses (lm-eval would skip one that does not, and then not know its task)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: None)  # lm-eval's !function
    for path in sorted(folder.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except yaml.YAMLError as e:
            raise FournilError(f"{path} does not parse as YAML: {' '.join(str(e).split())}") from None


def task_names(spec: str, known: set[str]) -> list[str]:
    """lm-eval task names for ``--tasks`` (bundled short names, or any task lm-eval knows from an include path)."""
    names = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        task = TASKS[name][0] if name in TASKS else name
        if task not in known:
            raise FournilError(f"unknown task {name!r}: bundled ones are {', '.join(TASKS)}; a YAML task of your own "
                               f"works with --include-path FOLDER")
        names.append(task)
    if not names:
        raise FournilError(f"--tasks is empty: give one or more of {', '.join(TASKS)}")
    return names


def bench(model: str, tasks: str = "hellaswag", limit: int | None = None, shots: int | None = None,
          include_path: str | None = None, device: str = "auto", dtype: str = "auto", batch_tokens: int = 1024,
          out: Path | None = None) -> dict:
    """Run ``tasks`` on ``model`` through lm-eval; returns lm-eval's results (and writes them, with a report, in
    ``out``)."""
    import datasets
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager, get_task_dict

    from fournil import __version__
    from fournil.evaluate.harness import FournilLM

    # lm-eval records the git commit of the folder it runs in by asking `git`, which prints "fatal: not a git
    # repository" on the terminal outside one; what ran is fournil, at its version
    lm_eval.evaluator.get_git_commit_hash = lambda: f"fournil {__version__}"
    if not sys.stderr.isatty():  # the bars of the datasets read are noise in a log, as fournil's own are left out
        datasets.disable_progress_bars()

    earlier = earlier_results(out, model) if out is not None else None  # (refused before anything runs)
    if limit is not None and limit < 1:
        raise FournilError(f"--limit must be at least 1 (got {limit}); leave it out for every row")
    if shots is not None and shots < 0:
        raise FournilError(f"--shots must be 0 or more (got {shots})")
    folder = Path(tempfile.mkdtemp(prefix="fournil-tasks-"))
    try:
        paths = [str(write_tasks(folder))]
        if include_path:
            if not Path(include_path).is_dir():
                raise FournilError(f"--include-path {include_path}: no such folder of lm-eval YAML tasks")
            check_yaml(Path(include_path))
            paths.append(include_path)
        manager = TaskManager(include_path=paths, include_defaults=False)
        names = task_names(tasks, set(manager.all_tasks))
        lm = FournilLM(model=model, device=device, dtype=dtype, batch_tokens=batch_tokens)  # (refused before the data)
        try:
            get_task_dict(names, manager)
        except Exception as e:  # noqa: BLE001 - lm-eval's own complaint about a task, in one line
            raise FournilError(f"a task of {', '.join(names)} is not valid: {e}") from None
        chat = any(n.endswith("_chat") for n in names)
        if chat:  # (a character model's tokenizer failed deep in lm-eval's request building)
            try:
                lm.tok.chat_ids([{"role": "user", "content": ""}])
            except NotAChatModel as e:
                raise FournilError(f"{model}: {e}, and the _chat tasks ask their questions in a chat: bench a chat "
                                   f"model, or this one on the tasks without _chat (gsm8k)") from None
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                                          apply_chat_template=chat, log_samples=False, verbosity="ERROR",
                                          bootstrap_iters=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if out is not None:
        card = with_earlier(results, earlier, model)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RESULTS, card)
        (out / "report.md").write_text(report(model, card, lm.run), encoding="utf-8")
    return results


def model_id(model: str) -> str:
    """What a report card is of: a model's path (the same folder however it is named), or its name."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def earlier_results(out: Path, model: str) -> dict | None:
    """The results already in ``out``: of this model, to keep beside the new (a task run again is replaced)."""
    if not (out / RESULTS).is_file():
        return None
    try:
        earlier = json.loads((out / RESULTS).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FournilError(f"{out / RESULTS} is damaged ({e}): delete it, or choose another --out") from None
    if earlier.get("model") != model_id(model):
        raise FournilError(f"{out} holds the results of {earlier.get('model', 'another model')}, not {model}: choose "
                           f"another --out")
    return earlier


def with_earlier(results: dict, earlier: dict | None, model: str) -> dict:
    """lm-eval's ``results`` and, for the tasks it did not run, the ``earlier`` ones (the sections keyed by task)."""
    card = {**json.loads(json.dumps(results, default=str)), "model": model_id(model)}
    for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        card[key] = {**(earlier or {}).get(key, {}), **card.get(key, {})}
    return card


def rows(results: dict) -> list[tuple[str, str, str, float]]:
    """(task, filter, metric, value) for every figure lm-eval reports."""
    out = []
    for task, figures in results["results"].items():
        for key, value in figures.items():
            metric, _, kind = key.partition(",")
            if isinstance(value, float) and not metric.endswith("_stderr") and metric != "alias":
                out.append((task, kind, metric, value))
    return out


def table(results: dict) -> str:
    """The figures, each with the rows of its task it comes from (fewer than the task's under --limit)."""
    scored = {task: n["effective"] for task, n in results.get("n-samples", {}).items()}
    lines = ["| task | filter | metric | value | rows |", "| --- | --- | --- | ---: | ---: |"]
    lines += [f"| {t} | {k} | {m} | {v:.4f} | {scored.get(t, '')} |" for t, k, m, v in rows(results)]
    return "\n".join(lines)


def stage(config) -> str:
    """How a run trained here was made (a GRPO run on GSM8K was said to be "aligned on preferences")."""
    if config.align is None:
        return "fine-tuned" if config.finetune else "pretrained here"
    if config.align.method == "grpo":
        return f"trained by GRPO against the reward {config.align.reward}"
    return "aligned on preferences (DPO)"  # (a reward model writes nothing to bench)


def report(model: str, results: dict, run) -> str:
    """A report card: the benchmark's figures and, for a run trained here, its own (its stage, val and test NLL, on
    as many tokens as its training validated on: all of GSM8K's val and test answers took 5 of the 5.5 minutes of a
    bench of 10 questions; `fournil eval` scores every one)."""
    text = f"# {model}\n\n{table(results)}\n"
    config = getattr(run, "config", None)
    if config is None or not (Path(str(run.path)) / "metrics.jsonl").exists():
        return text  # imported: no data of its own
    text += f"\n## The run\n\n{run.path}: {stage(config)}; {run.model.family}, {run.model.num_params():,} parameters\n"
    most = config.train.eval_tokens
    try:
        scores = run.evaluate(max_tokens=most)
    except FournilError as e:
        return text + f"\n(its own data could not be scored: {e})\n"
    counted = all("tokens" in figures for figures in scores.values())  # (not a preference method's scores)
    for split, figures in scores.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float))
        text += f"- {split}: {shown}" + (f" ({figures['tokens']:,} tokens)" if counted else "") + "\n"
    if counted and most:
        text += (f"\n(at most about {most:,} tokens of each split, as its training validated; `fournil eval "
                 f"{run.path}` scores them all)\n")
    return text
