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
python "$(dirname "$0")/../ask.py" "$PORT" "Quelle est la capitale de la France ?"
# À regarder : le même modèle qui répond par HTTP (ask.py : un court client en Python). Tout client OpenAI fonctionne
# avec http://127.0.0.1:8765/v1, et la page de conversation est à http://127.0.0.1:8765/ tant que le serveur tourne.
