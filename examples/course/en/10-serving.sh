#!/usr/bin/env bash
# Step 10 - Serving: the model behind an HTTP server, with the OpenAI API.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

echo "Name three colours." | fournil chat $CHAT_MODEL --max-new-tokens 40 --temperature 0
# Look at: the terminal chat, here fed one line; run `fournil chat smollm2` yourself to talk with it.

fournil serve $CHAT_MODEL --port $PORT &
SERVER=$!
trap 'kill $SERVER' EXIT
python "$(dirname "$0")/../ask.py" "$PORT" "Who wrote Romeo and Juliet?"
# Look at: the same model answering over HTTP (ask.py: a short client in plain Python). Any OpenAI client works
# against http://127.0.0.1:8765/v1, and the chat page is at http://127.0.0.1:8765/ while the server runs.
