#!/usr/bin/env bash
# Step 6 - Pretraining: a Llama-style model on Shakespeare, with the BPE tokens of step 5.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data shakespeare --model llama --tokenizer tokenizers/shakespeare-bpe512 $TRAIN --out runs/course/llama
# Look at: the tokens per second and the val loss in the progress lines; RoPE, RMSNorm and SwiGLU are in
# src/fournil/models/llama.py, one readable file.

fournil eval runs/course/llama
# Look at: the bits per byte, which compare a BPE model with a character model of the same text (NLL per token does
# not: a token holds several characters).

fournil sample runs/course/llama -n 1 --prompt "ROMEO:" --max-new-tokens 80 --seed 1
