"""Label maps from class maps (numpy only: imported by CRF worker processes, which must
start fast — no torch import)."""
from __future__ import annotations

import numpy as np


def maps_to_label(maps: np.ndarray, class_ids: np.ndarray, bg_threshold: float | None) -> np.ndarray:
    """Label map from class maps.

    Args:
        maps: ``(k, H, W)`` float in [0, 1].
        class_ids: ``(k,)`` class ids of the channels.
        bg_threshold: if given, the maps hold foreground classes only and a pixel is
            background (0) where ``max_c maps <= bg_threshold`` (a constant background channel
            at the threshold; ties go to background); if None, the channels already include
            background and the label is the argmax.
    Returns:
        ``(H, W)`` uint8 class ids.
    """
    k, H, W = maps.shape
    if bg_threshold is not None:
        if k == 0:
            return np.zeros((H, W), np.uint8)
        full = np.concatenate([np.full((1, H, W), bg_threshold, maps.dtype), maps])
        ids = np.concatenate([[0], class_ids])
        return ids[np.argmax(full, 0)].astype(np.uint8)
    return np.asarray(class_ids)[np.argmax(maps, 0)].astype(np.uint8)
