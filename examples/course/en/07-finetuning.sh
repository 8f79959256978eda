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
