#!/usr/bin/env bash
# Étape 2 - Pourquoi les contextes longs explosent quand on compte.
# Se souvenir de plus de caractères devrait aider : un trigramme regarde les deux derniers, un 5-gramme les quatre.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data prenoms --model ngram --n 3 --out runs/cours/prenoms-trigramme
fournil train --data prenoms --model ngram --n 5 --out runs/cours/prenoms-5gramme
fournil eval runs/cours/prenoms-bigramme runs/cours/prenoms-trigramme runs/cours/prenoms-5gramme
# À regarder : les trois dans un même tableau (plusieurs runs à évaluer : une ligne chacun). Le trigramme bat le
# bigramme, et le 5-gramme fait moins bien que le trigramme : la plupart des contextes de quatre caractères des
# prénoms inconnus n'ont jamais été vus à l'entraînement, leurs comptes ne disent rien. Ses prénoms tirés au sort
# (« samples ») finissent en suites de lettres au hasard.

python - <<'PY'
import fournil

run = fournil.load("runs/cours/prenoms-bigramme")
prenoms, V = run.splits().train, run.tokenizer.vocab_size
possibles, vus = "contextes possibles V^n", "vus à l'entraînement"
print(f"{'n':>2} {possibles:>28} {vus:>21}")
for n in range(1, 11):
    vus = {("." * n + p + ".")[i:i + n] for p in prenoms for i in range(len(p) + 1)}
    print(f"{n:>2} {V ** n:>28,} {len(vus):>21,}".replace(",", "\u202f"))  # 2 116 : les milliers à la française
PY
# À regarder : les contextes possibles croissent comme V^n (ici V = 46 : 46, 2 116, 97 336 ... 4,2 × 10^16 pour dix
# caractères ; le cours compte avec 40 symboles : 40, 1 600, 64 000 ... environ 1,05 × 10^16), alors que ceux que montrent les données plafonnent vers quelques dizaines de milliers. Une table de
# comptes ne peut rien généraliser d'un contexte à un contexte voisin ; l'étape suivante apprend des représentations
# qui le peuvent.
