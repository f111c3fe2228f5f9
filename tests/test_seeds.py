import numpy as np
import torch

from pipeline.seeds import maps_to_label, normalise_maps


def test_maps_to_label_threshold_by_hand():
    maps = np.array([[[0.1, 0.5], [0.9, 0.3]],
                     [[0.2, 0.6], [0.1, 0.35]]], np.float32)
    lab = maps_to_label(maps, np.array([3, 7]), 0.35)
    # (0,0): max 0.2 <= .35 -> bg; (0,1): class 7 (0.6); (1,0): class 3; (1,1): 0.35 tie -> bg
    assert (lab == np.array([[0, 7], [3, 0]])).all()
    assert (maps_to_label(np.zeros((0, 2, 2), np.float32), np.array([]), 0.3) == 0).all()
    # background included: plain argmax over channels
    probs = np.stack([1 - maps.max(0), maps[0], maps[1]])
    assert (maps_to_label(probs, np.array([0, 3, 7]), None)
            == np.array([[0, 7], [3, 0]])).all()


def test_normalise_max_and_minmax():
    m = torch.tensor([[[0.0, 2.0], [1.0, 4.0]]])
    assert torch.allclose(normalise_maps(m, "max", 0), m / 4)
    m2 = m + 1
    assert torch.allclose(normalise_maps(m2, "minmax", 0), m / 4)
