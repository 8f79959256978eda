#!/usr/bin/env bash
# Step 5 - Tokens and byte-pair encoding (BPE).
# Characters make long sequences. BPE starts from the 256 bytes and merges the most frequent pairs, again and again,
# into a vocabulary of common pieces of words.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil tokenizer train --data shakespeare --vocab-size 512 --out tokenizers/shakespeare-bpe512
# Look at: the compression on held-out text, in bytes per token (a character tokenizer gives 1).

fournil tokenize "To be, or not to be, that is the question. Ça coûte 3 € !" --tokenizer char \
  --tokenizer tokenizers/shakespeare-bpe512 --tokenizer $CHAT_MODEL --out tokens.png
# Look at: tokens.png, where each tokenizer cuts the text. Shakespeare's BPE keeps " that", " not" and " the" whole
# but cuts "question" into q|u|est|ion, and the French words (and the euro sign) into bytes it never merged;
# SmolLM2's 49,152 tokens keep " question" whole: a large vocabulary cuts less.

fournil tokenize "What is BPE?" --tokenizer $CHAT_MODEL --chat --out chat.png
# Look at: what a chat model reads when you send it "What is BPE?". Its chat template lays the conversation out in
# special tokens it learned in fine-tuning: SmolLM2's adds a default system message, then <|im_start|>user, your
# message, <|im_end|> and <|im_start|>assistant, after which its answer begins: about 30 tokens around yours.
