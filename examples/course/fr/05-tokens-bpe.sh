#!/usr/bin/env bash
# Étape 5 - Les jetons et le BPE (byte-pair encoding).
# Les caractères font des séquences longues. Le BPE part des 256 octets et fusionne les paires les plus fréquentes,
# encore et encore, en un vocabulaire de sous-mots courants.
set -euo pipefail
. "$(dirname "$0")/../budget.sh"

fournil tokenizer train --data miserables --vocab-size 512 --out tokenizers/miserables-bpe512
# À regarder : la compression sur un texte mis de côté, en octets par jeton (un tokeniseur de caractères donne 1).

fournil tokenize "Ça coûte 3 € ! Jean Valjean entra dans la maison. To be, or not to be." --tokenizer char \
  --tokenizer tokenizers/miserables-bpe512 --tokenizer $CHAT_MODEL --out tokens.png
# À regarder : tokens.png, où chaque tokeniseur coupe le texte. Le BPE des Misérables garde « dans » et « la » entiers
# mais coupe l'anglais (« To be, or not ») en petits morceaux ; SmolLM2, appris surtout sur de l'anglais, garde
# l'anglais entier mais coupe « maison » et « Valjean ».

fournil tokenize "Qu'est-ce que le BPE ?" --tokenizer $CHAT_MODEL --chat --out chat.png
# À regarder : ce que lit un modèle de chat quand on lui envoie « Qu'est-ce que le BPE ? ». Son modèle de
# conversation (chat template) met l'échange en forme avec des jetons spéciaux appris à l'affinage : celui de SmolLM2
# ajoute un message système par défaut, puis <|im_start|>user, votre message, <|im_end|> et <|im_start|>assistant,
# après quoi sa réponse commence : une trentaine de jetons autour des vôtres.
