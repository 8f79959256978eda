import pytest
import torch

from fournil.errors import FournilError
from fournil.generate.sampling import check_controls, filter_logits


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, 1.0, top_k=2, top_p=None).isfinite()
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_smallest_set_with_that_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: filter_logits(probs.log(), 1.0, None, p).isfinite().tolist()  # noqa: E731
    assert kept(0.5) == [[True, False, False, False]]
    assert kept(0.6) == [[True, True, False, False]]
    assert kept(0.81) == [[True, True, True, False]]
    assert kept(1.0) == [[True, True, True, True]]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    cold = filter_logits(logits, 0.5, None, None).softmax(-1)[0, 1]
    hot = filter_logits(logits, 2.0, None, None).softmax(-1)[0, 1]
    assert cold > logits.softmax(-1)[0, 1] > hot


@pytest.mark.parametrize("args", [(-1, None, None), (1.0, 0, None), (1.0, None, 0.0), (1.0, None, 1.5)])
def test_bad_controls(args):
    with pytest.raises(FournilError):
        check_controls(*args)
