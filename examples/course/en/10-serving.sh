#!/usr/bin/env bash
# Step 10 - Serving: the model behind an HTTP server, with the OpenAI API.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

echo "Name three colours." | fournil chat $CHAT_MODEL --max-new-tokens 40 --temperature 0
# Look at: the terminal chat, here fed one line; run `fournil chat smollm2` yourself to talk with it.

fournil serve $CHAT_MODEL --port $PORT &
SERVER=$!
trap 'kill $SERVER' EXIT
python - "$PORT" <<'PY'
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):  # the server loads the model first
    try:
        urllib.request.urlopen(base + "/health")
        break
    except OSError:
        time.sleep(0.2)

def post(path, body):
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request))

answer = post("/v1/chat/completions", {"model": "any", "max_tokens": 40, "temperature": 0,
                                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
print("OpenAI API:", answer["choices"][0]["message"]["content"])
print("tokens used:", answer["usage"])
print("/predict:", post("/predict", {"text": "Say hello.", "max_tokens": 20})["text"])
PY
# Look at: the same model answering over HTTP. Any OpenAI client works against http://127.0.0.1:8765/v1, and the
# chat page is at http://127.0.0.1:8765/ while the server runs.
