"""class_argmax: torch.argmax's answers, ties and NaN included."""

from __future__ import annotations

import torch

from carbseg.class_argmax import class_argmax


def test_equals_torch_argmax_on_random_scores_and_on_ties_and_nan():
    torch.manual_seed(0)
    scores = torch.randn(2, 7, 9, 11)
    assert torch.equal(class_argmax(scores), scores.argmax(dim=1))
    tied = torch.tensor([[[[1.0]], [[3.0]], [[3.0]], [[-1.0]]]])  # (1, 4, 1, 1): classes 1 and 2 tie
    assert class_argmax(tied).item() == 1 == tied.argmax(dim=1).item()  # the first maximum
    with_nan = tied.clone()
    with_nan[0, 3] = float("nan")
    assert class_argmax(with_nan).item() == 3 == with_nan.argmax(dim=1).item()  # NaN counts as the largest
    low = torch.full((1, 3, 2, 2), float("-inf"))
    assert torch.equal(class_argmax(low), low.argmax(dim=1))  # all -inf: index 0, as argmax
    assert torch.equal(class_argmax(scores, dim=0), scores.argmax(dim=0))
