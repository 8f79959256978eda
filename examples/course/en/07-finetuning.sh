#!/usr/bin/env bash
# Step 7 - Fine-tuning: teaching a pretrained model to follow instructions.
# Supervised fine-tuning shows (instruction, answer) pairs and puts the loss on the answer only. LoRA trains two
# small matrices beside each targeted weight matrix, which stays frozen.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil finetune $CHAT_MODEL --data rasbt_instructions --lora $TUNE --out runs/course/sft
# Look at: the trainable parameters (LoRA: about 2 % of the model); the NLL of held-out answers at step 0 (the base
# model) and during tuning, and on the last line what tuning gained; the answers to held-out instructions printed at
# the end.

fournil eval runs/course/sft
# Look at: the NLL of the held-out answers, on val and test.

ANSWER="The plural form of 'bacterium' is 'bacteria'."
QUESTION="What is the plural form of 'bacterium'?"  # (held out: tuning never saw it)
fournil explain $CHAT_MODEL "$ANSWER" --question "$QUESTION" --top 1 --out before.png
fournil explain runs/course/sft "$ANSWER" --question "$QUESTION" --top 1 --out after.png
# Look at: the dataset's own answer, token by token, as the model reads it after the question, before and after
# tuning. Tuning made the dataset's way of answering likelier: the quotes, the full stop and the end of the turn
# (from 0.82 to 0.99 in one run on a 2-core CPU), and the NLL of the whole answer fell from 4.1 to 1.4 nats. The fact
# moved less: "acteria" rose from 0.22 to 0.45, and the model still expects "acter" (bacterioplankton, say) more.
# A few minutes of tuning change the form of the answers more than what the model knows.
