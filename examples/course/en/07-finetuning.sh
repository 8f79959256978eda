#!/usr/bin/env bash
# Step 7 - Fine-tuning: teaching a pretrained model to follow instructions.
# Supervised fine-tuning shows (instruction, answer) pairs and puts the loss on the answer only. LoRA trains two
# small matrices beside each targeted weight matrix, which stays frozen.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil finetune $CHAT_MODEL --data rasbt_instructions --lora $TUNE --out runs/course/sft
# Look at: the trainable parameters (LoRA: about 1 % of the model), the val loss on held-out answers, and the
# answers to held-out instructions printed at the end, before and after.

fournil eval runs/course/sft
# Look at: the NLL of the held-out answers, against the base model's.
