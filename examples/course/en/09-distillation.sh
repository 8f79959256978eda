#!/usr/bin/env bash
# Step 9 - Distillation: a small student learns from a big teacher's probabilities.
# The student keeps a few of the teacher's layers (STUDENT in budget.sh: 4 of SmolLM2's 30) and learns to match the
# teacher's whole next-token distribution (softened by a temperature), not only the one right token. The same student
# is also trained without the teacher. Rows of 128 tokens (--context; 256 by default): in as few steps as these, the
# student learns more from its teacher on shorter rows (30 steps on Shakespeare: val NLL 5.42, against 5.66 on rows
# of 256 tokens, and 5.63 without the teacher either way).
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil distill --teacher $CHAT_MODEL --student $STUDENT --data shakespeare --context 128 $TUNE --out runs/course/student
# Look at: report.md (printed at the end): parameters, size on disk, decoding speed and val NLL of the teacher, the
# distilled student and the student trained alone; the distilled one should beat the one trained alone. On disk,
# the student can take more room than SmolLM2: a third of its parameters, but in 32 bits each, against 4 or 5.
