"""Step 10's client: wait for the server on 127.0.0.1:PORT, then ask QUESTION through the OpenAI API and /predict.

    python ask.py PORT QUESTION
"""
import json
import sys
import time
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
question = sys.argv[2]
for _ in range(300):  # the server loads the model first
    try:
        urllib.request.urlopen(base + "/health")
        break
    except OSError:
        time.sleep(0.2)


def post(path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request))


answer = post("/v1/chat/completions", {"model": "any", "max_tokens": 40, "temperature": 0,
                                       "messages": [{"role": "user", "content": question}]})
print("POST /v1/chat/completions:", answer["choices"][0]["message"]["content"])
print("usage:", answer["usage"])
print("POST /predict:", post("/predict", {"text": question, "max_tokens": 40})["text"])
