#!/usr/bin/env bash
# Step 2 - Why longer contexts explode with counts.
# Remembering more characters should help: a trigram looks at the last two, a 5-gram at the last four.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data names --model ngram --n 3 --out runs/course/names-trigram
fournil train --data names --model ngram --n 5 --out runs/course/names-5gram
fournil eval runs/course/names-bigram runs/course/names-trigram runs/course/names-5gram
# Look at: the three in one table (several runs to eval: a row each). The trigram beats the bigram on val and test,
# and the 5-gram is worse than the trigram: most contexts of four characters in unseen names were never seen in
# training, so their counts say nothing. Its samples (printed by train) end in random letters.

python - <<'PY'
import fournil

run = fournil.load("runs/course/names-bigram")
names, V = run.splits().train, run.tokenizer.vocab_size
print(f"{'n':>2} {'possible contexts V^n':>26} {'seen in training':>17}")
for n in range(1, 11):
    seen = {("." * n + name + ".")[i:i + n] for name in names for i in range(len(name) + 1)}
    print(f"{n:>2} {V ** n:>26,} {len(seen):>17,}")
PY
# Look at: the possible contexts grow as V^n (here V = 27: 27, 729, 19,683 ... 2 x 10^14 for ten characters; the
# course material counts with 40 symbols: 40, 1,600, 64,000 ... about 1.05 x 10^16),
# while the contexts the data shows level off near 55,000. A table of counts cannot generalize from one
# context to a similar one; the next step learns representations that can.
