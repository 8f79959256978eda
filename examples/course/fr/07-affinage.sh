#!/usr/bin/env bash
# Étape 7 - L'affinage (fine-tuning) : apprendre à un modèle pré-entraîné à suivre des instructions.
# L'affinage supervisé montre des paires (instruction, réponse) et ne compte la perte que sur la réponse. LoRA
# entraîne deux petites matrices à côté de chaque matrice de poids ciblée, qui reste gelée.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

# Les consignes de fr_oasst1 et leurs réponses sont longues (200 jetons en moyenne, 3,5 fois celles de l'étape 7 en
# anglais) : 30 pas prendraient une dizaine de minutes sur 2 cœurs ; le budget (budget.sh) arrête l'affinage à 5
# minutes (17 pas sur un EPYC à 2 cœurs).
fournil finetune $CHAT_MODEL --data fr_oasst1 --lora $TUNE --out runs/cours/sft
# À regarder : les paramètres entraînables (LoRA : environ 2 % du modèle) ; la NLL des réponses mises de côté, au
# pas 0 (le modèle de départ) puis pendant l'affinage, et sur la dernière ligne ce que l'affinage a gagné (de 3,08 à
# 2,87 en 5 minutes) ; les réponses à des consignes mises de côté, affichées à la fin.

fournil eval runs/cours/sft
# À regarder : la NLL des réponses mises de côté, en validation et en test.

echo "Nomme trois couleurs." | fournil chat $CHAT_MODEL --max-new-tokens 40 --temperature 0
echo "Nomme trois couleurs." | fournil chat runs/cours/sft --max-new-tokens 40 --temperature 0
# À regarder : SmolLM2, qui a surtout lu de l'anglais, commence en français puis passe à l'anglais ; affiné, il reste
# en français, sans nommer de couleur pour autant. Quelques minutes d'affinage changent la forme des réponses (la
# langue), guère ce que le modèle sait.
