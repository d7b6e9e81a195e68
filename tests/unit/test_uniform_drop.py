"""DARE's drop decided on the generator's words equals comparing the float32 uniforms."""

import numpy as np
import pytest
import torch

from crdtmerge.rng import CounterRNG
from crdtmerge.strategies._sparsify import Uniforms


class _Task:
    rng = CounterRNG(b"\x02" * 32)
    streams = (b"contribution",)


N = 200_003
_U = Uniforms(_Task(), 0, N)
_EDGE = [float(k) * 2.0**-24 for k in (_U._words[:4] >> np.uint32(8))]


@pytest.mark.parametrize(
    "p",
    [0.0, 1.0, 0.5, 1e-9, 2.0**-24, 3 * 2.0**-25, 0.9999999, 1 - 2.0**-24, 0.1, 1 / 3, -0.1, 1.5]
    + _EDGE,
)
def test_word_comparison_is_bit_identical_to_uniform_comparison(p):
    expected = _U(0, N) >= torch.tensor(p, dtype=torch.float32)
    assert torch.equal(_U.drop(0, N, p), expected)
    assert torch.equal(_U.drop(1000, 5000, p), expected[1000:5000])
