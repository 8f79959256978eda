#!/usr/bin/env bash
# Étape 9 - La distillation : un petit élève apprend les probabilités d'un grand maître.
# L'élève garde quelques couches du maître (STUDENT dans budget.sh : 4 des 30 de SmolLM2) et apprend toute sa
# distribution du jeton suivant (adoucie par une température), pas seulement le bon jeton. Le même élève est aussi
# entraîné sans le maître, pour comparer. Des lignes de 128 jetons (--context ; 256 par défaut) : en aussi peu de pas,
# l'élève apprend davantage de son maître sur des lignes courtes.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil distill --teacher $CHAT_MODEL --student $STUDENT --data miserables --context 128 $TUNE --out runs/cours/eleve
# À regarder : report.md (affiché à la fin) : paramètres, taille sur disque, vitesse de décodage et NLL de validation
# du maître, de l'élève distillé et de l'élève seul ; le distillé doit battre celui qui a appris seul. Sur disque,
# l'élève peut prendre plus de place que SmolLM2 : un tiers de ses paramètres, mais de 32 bits chacun, contre 4 ou 5.
