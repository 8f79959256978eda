#!/usr/bin/env bash
# Step 3 - The MLP (Bengio et al. 2003) and embeddings.
# Each character becomes a learned vector (its embedding); the vectors of the last 5 characters go through a hidden
# layer that predicts the next one. Similar characters get similar vectors, so what is learned about one context
# helps similar ones.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data names --model mlp $TRAIN --out runs/course/names-mlp
# Look at: the train and val loss falling together in the progress lines, and runs/course/names-mlp/loss.png.

fournil eval runs/course/names-bigram runs/course/names-mlp
# Look at: a val NLL well below the bigram's 2.45 (about 2.0), with five characters of context.

fournil embeddings runs/course/names-mlp --out embeddings.png
# Look at: embeddings.png, the embeddings' two principal components: the vowels (a, e, i, o, u) tend to group
# together, apart from the consonants ('.' is the start and end of a name). Nobody told the model what a vowel is.

fournil sample runs/course/names-mlp -n 10 --seed 1
