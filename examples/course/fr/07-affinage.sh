#!/usr/bin/env bash
# Étape 7 - L'affinage (fine-tuning) : apprendre à un modèle pré-entraîné à suivre des instructions.
# L'affinage supervisé montre des paires (instruction, réponse) et ne compte la perte que sur la réponse. LoRA
# entraîne deux petites matrices à côté de chaque matrice de poids ciblée, qui reste gelée.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil finetune $CHAT_MODEL --data fr_oasst1 --lora $TUNE --out runs/cours/sft
# À regarder : les paramètres entraînables (LoRA : environ 1 % du modèle), la perte de validation sur des réponses
# mises de côté, et les réponses à des instructions mises de côté, affichées à la fin.

fournil eval runs/cours/sft
# À regarder : la NLL des réponses mises de côté, face à celle du modèle de départ.
