#!/usr/bin/env bash
# Étape 10 - Servir le modèle : un serveur HTTP avec l'API d'OpenAI.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

echo "Nomme trois couleurs." | fournil chat $CHAT_MODEL --max-new-tokens 40 --temperature 0
# À regarder : la conversation dans le terminal, ici nourrie d'une ligne ; lancez `fournil chat smollm2` pour parler
# avec le modèle.

fournil serve $CHAT_MODEL --port $PORT &
SERVEUR=$!
trap 'kill $SERVEUR' EXIT
python - "$PORT" <<'PY'
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):  # le serveur charge d'abord le modèle
    try:
        urllib.request.urlopen(base + "/health")
        break
    except OSError:
        time.sleep(0.2)

def post(chemin, corps):
    requete = urllib.request.Request(base + chemin, json.dumps(corps).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(requete))

reponse = post("/v1/chat/completions", {"model": "any", "max_tokens": 40, "temperature": 0,
                                         "messages": [{"role": "user", "content": "Quelle est la capitale de la France ?"}]})
print("API OpenAI :", reponse["choices"][0]["message"]["content"])
print("tokens utilisés :", reponse["usage"])
print("/predict :", post("/predict", {"text": "Dis bonjour.", "max_tokens": 20})["text"])
PY
# À regarder : le même modèle qui répond par HTTP. Tout client OpenAI fonctionne avec http://127.0.0.1:8765/v1, et la
# page de conversation est à http://127.0.0.1:8765/ tant que le serveur tourne.
