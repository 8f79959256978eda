#!/usr/bin/env bash
# Étape 1 - Compter : le modèle bigramme.
# Un modèle de langue donne une probabilité au caractère suivant. Le plus simple compte, dans 37 000 prénoms
# français, combien de fois chaque caractère en suit un autre, et transforme ces comptes en probabilités.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data prenoms --model ngram --n 2 --out runs/cours/prenoms-bigramme
# À regarder : « 2,116 parameters », soit 46 × 46 = 2 116 comptes (45 caractères, accents compris, et « . » qui marque le
# début et la fin d'un prénom) : c'est tout ce que le modèle sait.

fournil explain runs/cours/prenoms-bigramme marie --out marie.png
# À regarder : chaque transition et sa probabilité (.m, ma, ar, ri, ie, e.) ; la NLL (log-vraisemblance négative)
# est moins la somme de leurs logarithmes. Une transition rare coûte beaucoup de nats. marie.png les montre en barres.

fournil eval runs/cours/prenoms-bigramme
# À regarder : la NLL moyenne par caractère sur des prénoms jamais vus, environ 2,5 nats. Sans rien savoir
# (46 caractères également probables) on paierait log(46) = 3,83 nats.

fournil sample runs/cours/prenoms-bigramme -n 10 --seed 1
# À regarder : des prénoms presque plausibles, car le modèle ne se souvient que du dernier caractère.
