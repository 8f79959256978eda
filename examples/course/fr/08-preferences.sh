#!/usr/bin/env bash
# Étape 8 - L'alignement sur les préférences humaines : DPO.
# Chaque exemple est une consigne avec une réponse choisie et une réponse rejetée (ici en anglais : une polie, une
# impolie). DPO rend la réponse choisie plus probable par rapport à un modèle de référence figé, et la rejetée moins,
# sans modèle de récompense à part.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

# Un pas lit la consigne de chaque paire une fois, puis ses deux réponses, avec le modèle et avec sa référence : 30 pas
# ont pris 2 minutes sur 2 cœurs (un AMD EPYC), et le budget (budget.sh) s'arrête à 5 sur une machine plus lente.
fournil align $CHAT_MODEL --data rasbt_preferences --lora $TUNE --out runs/cours/dpo
# À regarder : val_reward_accuracy, la part des paires mises de côté où le modèle préfère maintenant la réponse
# choisie, et la marge entre les deux (au départ le modèle est sa propre référence : chaque marge vaut 0, aucune
# préférence encore).

fournil eval runs/cours/dpo
