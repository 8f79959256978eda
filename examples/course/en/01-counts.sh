#!/usr/bin/env bash
# Step 1 - Counting: the bigram model.
# A language model gives a probability to the next character. The simplest one counts, in 32,000 English first
# names, how often each character follows each other one, and turns the counts into probabilities.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data names --model ngram --n 2 --out runs/course/names-bigram
# Look at: "27 x 27" counts (26 letters and '.', which marks where a name starts and ends) are all the model has.

fournil explain runs/course/names-bigram emma --out emma.png
# Look at: each transition and its probability (.e, em, mm, ma, a.); the NLL is minus the sum of their logs.
# A rare transition (a low probability) costs many nats. emma.png shows the same as bars.

fournil eval runs/course/names-bigram
# Look at: the average negative log-likelihood (NLL) per character on names the model never saw, about 2.45 nats.
# Knowing nothing (27 equally likely characters) costs log(27) = 3.30 nats: counting pairs already saves a quarter.

fournil sample runs/course/names-bigram -n 10 --seed 1
# Look at: names that sound almost right, because only the last character is remembered.
