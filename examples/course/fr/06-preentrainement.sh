#!/usr/bin/env bash
# Étape 6 - Le pré-entraînement : un modèle de type Llama sur Les Misérables, avec les jetons BPE de l'étape 5.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data miserables --model llama --tokenizer tokenizers/miserables-bpe512 $TRAIN --out runs/cours/llama
# À regarder : les jetons par seconde et la perte de validation ; RoPE, RMSNorm et SwiGLU sont dans
# src/fournil/models/llama.py, un seul fichier lisible.

fournil eval runs/cours/llama
# À regarder : les bits par octet, qui comparent un modèle BPE et un modèle de caractères sur le même texte (la NLL
# par jeton, non : un jeton contient plusieurs caractères).

fournil sample runs/cours/llama -n 1 --prompt "Jean Valjean" --max-new-tokens 80 --seed 1
