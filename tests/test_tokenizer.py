import pytest

from fournil.errors import FournilError
from fournil.tokenizers import CharTokenizer, load_tokenizer


def test_roundtrip_save_and_load(tmp_path):
    tok = CharTokenizer.train(["andré", "zoé"], boundary=True)
    assert tok.vocab_size == 1 + len(set("andrézoé"))
    assert tok.boundary_id == 0
    ids = tok.encode("zoé")
    assert tok.decode([0, *ids, 0]) == "zoé"
    tok.save(tmp_path / "tokenizer.json")
    assert "é" in (tmp_path / "tokenizer.json").read_text(encoding="utf-8")  # stored readable, not escaped
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.itos == tok.itos


def test_unknown_characters_are_named():
    tok = CharTokenizer.train(["abc"], boundary=False)
    with pytest.raises(FournilError, match=r"'x', 'z' are not in the model's vocabulary"):
        tok.encode("axbz")
    with pytest.raises(FournilError, match=r"'A', 'C' are not in the model's vocabulary .*; try 'abca'$"):
        tok.encode("AbCa")  # a lowercase vocabulary: the same text in lowercase is the fix
    with pytest.raises(FournilError, match=r"'A', 'x' are .*; remove or replace them$"):
        tok.encode("Ax")  # lowercase is not enough
    with pytest.raises(FournilError, match=r"^'Ç' is not in the model's vocabulary .*; remove or replace it$"):
        tok.encode("Ça")
    with pytest.raises(FournilError, match=r"^'0', '1', .*, 'B' and 24 more are not in the model's vocabulary \("):
        tok.encode("0123456789" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[::-1])  # a text of other characters: the first 12
