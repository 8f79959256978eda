#!/usr/bin/env bash
# Step 8 - Learning from preferences: DPO.
# Each example is a prompt with a chosen and a rejected answer. DPO raises the chosen answer's likelihood relative to
# a frozen reference, and lowers the rejected one's, without a separate reward model.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

# A step reads each pair's prompt once, then its two answers, under the model and under its reference: 30 steps took
# 2 minutes on 2 cores (an AMD EPYC), and the budget (budget.sh) stops at 5 on a slower machine.
fournil align $CHAT_MODEL --data rasbt_preferences --lora $TUNE --out runs/course/dpo
# Look at: val_reward_accuracy, the share of held-out pairs where the model now prefers the chosen answer, and the
# margin between the two (at the start the model is its own reference: every margin is 0, no preference yet).

fournil eval runs/course/dpo
