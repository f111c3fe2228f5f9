"""bench.quality.in_out_means: the per-class inside / background means of issue 15's diagnostic
(`python -m bench cam_in_out`), against hand-computed values."""
import math

import numpy as np
import pytest

from bench.quality import in_out_means


def test_in_out_means_hand_values():
    gt = np.array([[0, 1, 1], [255, 2, 0]], np.uint8)
    cams = np.array([[[0.1, 0.9, 0.7], [0.5, 0.3, 0.2]],      # class 1
                     [[0.4, 0.0, 0.0], [1.0, 0.6, 0.8]],      # class 2
                     [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])     # class 3: no GT pixel -> no row
    rows = in_out_means(cams, [1, 2, 3], gt)
    assert [r[0] for r in rows] == [1, 2]
    # class 1: inside (0.9 + 0.7) / 2; background = pixels (0,0) and (1,2): (0.1 + 0.2) / 2;
    # the void pixel (0.5) and class 2's pixel (0.3) count in neither
    assert rows[0][1:] == pytest.approx((0.8, 0.15))
    assert rows[1][1:] == pytest.approx((0.6, 0.6))          # (0.4 + 0.8) / 2 on background


def test_in_out_means_no_background_and_shape_errors():
    gt = np.array([[1, 1], [255, 1]], np.uint8)
    (cid, inside, out), = in_out_means(np.full((1, 2, 2), 0.5), [1], gt)
    assert (cid, inside) == (1, 0.5) and math.isnan(out)
    with pytest.raises(ValueError, match="do not match"):
        in_out_means(np.zeros((1, 3, 2)), [1], gt)
    with pytest.raises(ValueError, match="do not match"):
        in_out_means(np.zeros((2, 2, 2)), [1], gt)
