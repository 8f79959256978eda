#!/usr/bin/env bash
# Étape 4 - Le Transformer et l'attention.
# Dans un GPT, chaque position regarde toutes les précédentes et décide combien chacune compte : c'est l'attention.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil train --data prenoms --model gpt $TRAIN --out runs/cours/prenoms-gpt
fournil eval runs/cours/prenoms-bigramme runs/cours/prenoms-mlp runs/cours/prenoms-gpt --plot echelle.png
# À regarder : l'échelle jusqu'ici dans un même tableau, et la meilleure NLL de l'échelle (en cinq minutes,
# --time 5m, environ 1,90 en validation et 1,91 en test ; les deux minutes de budget.sh finissent un peu plus haut).
# echelle.png trace leur NLL de validation selon le temps d'entraînement, le bigramme en pointillés : quel modèle
# apprend le plus dans les premières secondes, et lequel finit le plus bas ?

fournil attention runs/cours/prenoms-gpt marie-claire --token c --out attention-prenoms.png
# À regarder : attention-prenoms.png, une carte par tête : la ligne i montre combien le caractère i lit chacun des
# précédents. Les têtes se spécialisent : certaines lisent le caractère d'avant, d'autres le début du prénom.

fournil attention $CHAT_MODEL "The animal didn't cross the street because it was too tired" --token it --out attention-it.png
# À regarder : dans un vrai modèle (SmolLM2, qui a surtout lu de l'anglais), ce que lit « it ». Beaucoup de poids va
# au premier jeton (un « puits d'attention » où les têtes posent le poids dont elles n'ont pas besoin) ; le reste va
# aux mots qui donnent son sens à « it ».

fournil explain $CHAT_MODEL "The capital of France is Paris, and the capital of Italy is Rome." --out capitale-en.png
fournil explain $CHAT_MODEL "La capitale de la France est Paris, et celle de l'Italie est Rome." --out capitale.png
# À regarder : les jetons que le modèle attendait et ceux qui l'ont surpris. En anglais, SmolLM2 attend Paris et Rome
# (probabilité 0,77 chacun) ; en français, qu'il a peu lu, Paris le surprend (0,0001) et sa NLL moyenne par jeton
# double (3,6 contre 1,7). Un modèle ne sait que ce qu'il a lu.

fournil train --model seq2seq $TRAIN --out runs/cours/nombres-seq2seq
fournil sample runs/cours/nombres-seq2seq --prompt 71080
fournil attention runs/cours/nombres-seq2seq 71080 --out attention-croisee.png
# À regarder : le Transformer complet, encodeur et décodeur, qui écrit les nombres en toutes lettres (71 080 : soixante
# et onze mille quatre-vingts). attention-croisee.png a une ligne par lettre écrite et une colonne par chiffre : où le
# décodeur regarde dans la source. Des têtes de la dernière couche alignent les mots sur leurs chiffres, comme en
# traduction.
