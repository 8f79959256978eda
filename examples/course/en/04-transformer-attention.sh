#!/usr/bin/env bash
# Step 4 - The Transformer and attention.
# In a GPT every position looks back at all the earlier ones and decides how much each matters: attention.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data names --model gpt $TRAIN --out runs/course/names-gpt
fournil eval runs/course/names-bigram runs/course/names-mlp runs/course/names-gpt --plot ladder.png
# Look at: the ladder so far in one table, and the best NLL of the ladder (the README's five-minute run, --time 5m,
# reaches about 1.92 on val and 1.95 on test; budget.sh's two minutes end a little higher). ladder.png draws their
# val NLL against training time, the bigram as a dashed level: which model learns most in the first seconds, and
# which ends lowest?

fournil attention runs/course/names-gpt emmanuel --token u --out attention-names.png
# Look at: attention-names.png, one map per head: row i shows how much character i reads each earlier character.
# Heads specialize: some read the previous character, some the start of the name.

fournil attention $CHAT_MODEL "The animal didn't cross the street because it was too tired" --token it --out attention-it.png
# Look at: in a real model (SmolLM2), what "it" attends to. Much weight goes to the first token (an "attention
# sink", where heads put weight they do not need); the rest lands on the words that give "it" its meaning.

fournil explain $CHAT_MODEL "The capital of France is Paris, and the capital of Italy is Rome." --out capital.png
# Look at: which tokens the model expected (Paris, Rome: high probability) and which surprised it.

fournil train --model seq2seq $TRAIN --out runs/course/nombres-seq2seq
fournil sample runs/course/nombres-seq2seq --prompt 71080
fournil attention runs/course/nombres-seq2seq 71080 --out cross-attention.png
# Look at: the full Transformer, encoder and decoder, writing numbers in French words (71 080: soixante et onze mille
# quatre-vingts). cross-attention.png has a row for each letter it writes and a column for each digit: where the
# decoder looks in the source. Heads of the last layer align the words with their digits, as in translation.
