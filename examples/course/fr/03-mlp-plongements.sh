#!/usr/bin/env bash
# Étape 3 - Le MLP (Bengio et al. 2003) et les plongements (embeddings).
# Chaque caractère devient un vecteur appris (son plongement) ; les vecteurs des 5 derniers caractères traversent une
# couche cachée qui prédit le suivant. Des caractères semblables reçoivent des vecteurs proches : ce qui est appris
# sur un contexte sert aux contextes voisins.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data prenoms --model mlp $TRAIN --out runs/cours/prenoms-mlp
# À regarder : les pertes d'entraînement et de validation qui baissent ensemble, et runs/cours/prenoms-mlp/loss.png.

fournil eval runs/cours/prenoms-bigramme runs/cours/prenoms-mlp
# À regarder : une NLL de validation bien sous les 2,5 du bigramme (environ 2,0), avec cinq caractères de contexte.

fournil embeddings runs/cours/prenoms-mlp --out plongements.png
# À regarder : plongements.png, les deux composantes principales des plongements : les voyelles tendent à se
# regrouper, à l'écart des consonnes (« . » marque le début et la fin d'un prénom ; et où vont é, è, ë ?). Personne
# n'a dit au modèle ce qu'est une voyelle.

fournil sample runs/cours/prenoms-mlp -n 10 --seed 1
