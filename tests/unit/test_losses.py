import math

import pytest
import torch

from neighborretr.losses import symmetric_infonce


def test_infonce_hand_computed_2x2():
    sim = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    scale = torch.tensor(math.log(10.0))
    # rows: logits [5, 1] and [2, 4]; columns: [5, 2] and [1, 4]
    rows = -(5 - math.log(math.exp(5) + math.exp(1))) - (4 - math.log(math.exp(2) + math.exp(4)))
    cols = -(5 - math.log(math.exp(5) + math.exp(2))) - (4 - math.log(math.exp(1) + math.exp(4)))
    expected = (rows / 2 + cols / 2) / 2
    assert symmetric_infonce(sim, scale).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_uniform_is_log_b_and_symmetric():
    sim = torch.zeros(4, 4)
    assert symmetric_infonce(sim, torch.tensor(0.0)).item() == pytest.approx(math.log(4))
    x = torch.randn(5, 5)
    torch.testing.assert_close(symmetric_infonce(x, torch.tensor(1.0)), symmetric_infonce(x.t(), torch.tensor(1.0)))


def test_infonce_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        symmetric_infonce(torch.zeros(2, 3), torch.tensor(0.0))
