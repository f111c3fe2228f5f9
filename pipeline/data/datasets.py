"""torch Datasets over a VOC-layout root with image-level labels."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data import transforms
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from pipeline.data.voc import NUM_CLASSES, labels_to_multihot, load_image


def random_scale_crop(image: np.ndarray, rng: np.random.Generator, crop: int | None,
                      scale_range: Sequence[float], hflip: bool = True,
                      label: np.ndarray | None = None, ignore: int = 255,
                      fill: Sequence[float] = IMAGENET_MEAN, geometry: dict | None = None):
    """Random rescale, horizontal flip and ``crop x crop`` crop (pad where smaller).

    The image is padded with the colour ``fill * 255`` (``fill``: the normalisation mean, so
    the padding is zero after normalisation; default ImageNet's); a label map
    given alongside is transformed identically (nearest) and padded with ``ignore``.
    ``crop=None``: the whole rescaled, flipped image (no padding, no crop; the same random
    draws for the scale and the flip).

    Args:
        image: ``(H, W, 3)`` uint8.
        rng: numpy Generator (determinism).
        crop: output side in pixels, or None (whole image).
        scale_range: ``(lo, hi)`` factor applied to the image size.
        label: optional ``(H, W)`` uint8.
        geometry: a dict to fill (the draws are the same with or without it) with
            ``scaled`` ``(h', w')``, the rescaled size; ``flip``, the horizontal flip; and
            ``offset`` ``(dy, dx)``: output pixel ``(r, c)`` is pixel ``(r + dy, c + dx)`` of the
            rescaled, flipped image (outside ``[0, h') x [0, w')``: padding). For maps of the
            original image that must follow the crop (SMAF's offline teacher maps).
    Returns:
        ``(image (crop, crop, 3) uint8, label (crop, crop) uint8 or None, valid (crop, crop) bool)``;
        with ``crop=None`` the rescaled size ``(h', w')`` instead of ``(crop, crop)``, all valid.
    """
    h, w = image.shape[:2]
    s = float(rng.uniform(scale_range[0], scale_range[1]))
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    lab = None if label is None else np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    flip = bool(hflip and rng.random() < 0.5)
    if flip:
        img = img[:, ::-1]
        lab = None if lab is None else lab[:, ::-1]
    if geometry is not None:
        geometry.update(scaled=(nh, nw), flip=flip, offset=(0, 0))
    if crop is None:
        return (img.copy(), None if lab is None else lab.copy(), np.ones((nh, nw), bool))
    ph, pw = max(crop, nh), max(crop, nw)
    canvas = np.empty((ph, pw, 3), np.uint8)
    canvas[:] = (np.array(fill, dtype=np.float64) * 255).astype(np.uint8)
    valid = np.zeros((ph, pw), bool)
    lcanvas = np.full((ph, pw), ignore, np.uint8)
    oy, ox = int(rng.integers(0, ph - nh + 1)), int(rng.integers(0, pw - nw + 1))
    canvas[oy:oy + nh, ox:ox + nw] = img
    valid[oy:oy + nh, ox:ox + nw] = True
    if lab is not None:
        lcanvas[oy:oy + nh, ox:ox + nw] = lab
    cy, cx = int(rng.integers(0, ph - crop + 1)), int(rng.integers(0, pw - crop + 1))
    if geometry is not None:
        geometry["offset"] = (cy - oy, cx - ox)
    sl = (slice(cy, cy + crop), slice(cx, cx + crop))
    return canvas[sl].copy(), (lcanvas[sl].copy() if lab is not None else None), valid[sl].copy()


#: :class:`ClassificationDataset`'s ``extra_views`` (None: none)
EXTRA_VIEWS = (None, "base", "mcc", "geometry")


class ClassificationDataset(Dataset):
    """Images with multi-hot image-level labels for classifier training.

    Item: ``(x float32 (3, crop, crop) normalised, y float32 (C-1,) multi-hot, index)``;
    ``crop=None``: ``x`` is the whole rescaled, flipped image ``(3, h', w')`` (sizes differ from
    image to image, so a batch holds one image: :func:`pipeline.steps.cls.train_classifier`
    requires ``batch_size: 1`` then).
    Randomness comes from ``np.random.default_rng((seed, epoch, index))`` so runs are
    reproducible regardless of worker count; call :meth:`set_epoch` each epoch.

    ``resize_long = (lo, hi)`` (ints, pixels) replaces ``scale_range``: the image is rescaled
    so that its long side is an integer drawn uniformly from ``[lo, hi]`` (both included;
    PSA / ACR ``RandomResizeLong``, ACR official ``[int(0.9 crop), int(crop / 0.875)]`` =
    ``[345, 438]`` at crop 384), then flipped and cropped as usual.

    ``mean`` / ``std``: the input normalisation of :func:`pipeline.data.transforms.to_tensor`
    (the backbone's, :func:`pipeline.models.backbones.backbone_normalisation`; default
    ImageNet's); the padding colour is ``mean``.

    ViT-PCM's training geometry and augmentation (official deepplants/ViT-PCM
    ``dataloader.py: _preprocess_image``, ``utils.py: affine_transform`` /
    ``color_transform``), each off by default:

    * ``resize_square = S``: every image is first resized (bilinear) to ``S x S``, aspect
      ignored; with ``crop=None`` and no rescale (``scale_range`` (1, 1), no ``resize_long``)
      all items are ``S x S`` and batch as usual (the code's 384 x 384 input);
    * ``color_jitter``: keyword arguments of :func:`pipeline.data.transforms.color_jitter`
      (``{}``: its defaults = the code's), TF semantics, after the crop (an unknown key is a
      ValueError here, before any training);
    * ``vflip`` / ``transpose``: a vertical flip / a transpose (rows <-> columns), p 0.5 each,
      after the colour jitter (with ``hflip`` the code's eight dihedral cases, uniformly).

    These draws come after the rescale / flip / crop draws, so a dataset without them
    reproduces the earlier items exactly.

    ``extra_views`` (:meth:`pipeline.methods.base.Method.extra_views`): the item gains a fourth
    element, a dict of tensors that the trainer passes to the method's loss as keywords:

    * ``"base"`` (ViT-PCM's independent second view, official ``_preprocess_image``: both
      views are made from the resized image, each with its own ``color_transform`` and
      ``affine_transform``): ``base`` ``float32 (3, S, S)`` - the square-resized image with a
      colour jitter of its own (drawn after every view-1 draw, so view 1 is unchanged), no
      flip - and ``base_code`` ``int64 (3,)``: view 1's (left-right flip, up-down flip,
      transpose), applied in that order to the base. Needs ``resize_square``, ``crop=None``,
      no rescale (ValueError otherwise).
    * ``"mcc"`` (MCC's views, official fwu11/MCC ``datasets/voc.py: VOC12ClsDataset``): ``x``
      becomes global view 1 = the rescaled / flipped / cropped image under
      :func:`~pipeline.data.transforms.mcc_view` (blur p 1.0); ``global2`` ``float32 (3, crop,
      crop)`` = global view 2, a random resized crop of the whole image (before the rescale;
      blur p 0.1, solarize p 0.2); ``local`` ``float32 (3, crop, crop)`` = the same crop as
      view 1 before its augmentation, under its own (blur p 0.5). Their three seeds are drawn
      right after the rescale / flip / crop draws. Needs ``crop`` (ValueError otherwise).
    * ``"geometry"`` (SMAF's offline teacher maps, official bupt-ai-cz/SMAF
      ``data/VOC_dataset.py: transform_with_mask``, which crops / flips the stored map with the
      image): ``geometry`` ``int64 (6,)`` = ``(index, h', w', flip, dy, dx)`` of
      :func:`random_scale_crop` (output pixel ``(r, c)`` = pixel ``(r + dy, c + dx)`` of the
      image rescaled to ``h' x w'`` and then flipped); ``x`` is unchanged. Needs no ``vflip``
      / ``transpose`` (ValueError otherwise: the map would not follow them).

    ``background_absent`` (ids whose mask has no background pixel, the manifest's
    ``no_background``): when given, ``y`` is ``(C,)`` with ``y[0]`` the background label
    (0 for those ids, else 1) before the foreground multi-hot — for methods that classify the
    background (ViT-PCM, :meth:`pipeline.methods.base.Method.wants_background_label`).
    """

    def __init__(self, root: str | Path, ids: Sequence[str], labels: Mapping[str, Sequence[int]],
                 crop: int | None, scale_range: Sequence[float] | None = (1.0, 1.0), hflip: bool = True,
                 seed: int = 0, num_classes: int = NUM_CLASSES,
                 resize_long: Sequence[int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 resize_square: int | None = None, vflip: bool = False, transpose: bool = False,
                 color_jitter: Mapping | None = None,
                 background_absent: Collection[str] | None = None,
                 extra_views: str | None = None):
        self.root, self.ids, self.labels = Path(root), list(ids), labels
        self.crop, self.hflip = (None if crop is None else int(crop)), hflip
        self.scale_range = tuple(scale_range) if scale_range else (1.0, 1.0)
        self.resize_long = tuple(int(v) for v in resize_long) if resize_long else None
        self.seed, self.epoch, self.num_classes = seed, 0, num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize_square = int(resize_square) if resize_square else None
        self.vflip, self.transpose = bool(vflip), bool(transpose)
        self.color_jitter = None if color_jitter is None else dict(color_jitter)
        if self.color_jitter:
            allowed = list(inspect.signature(transforms.color_jitter).parameters)[2:]
            bad = sorted(set(self.color_jitter) - set(allowed))
            if bad:
                raise ValueError(f"train_cls.color_jitter: unknown keys {bad}; allowed: {allowed} "
                                 "(pipeline.data.transforms.color_jitter)")
        self.background_absent = None if background_absent is None else set(background_absent)
        if extra_views not in EXTRA_VIEWS:
            raise ValueError(f"ClassificationDataset: extra_views must be one of {EXTRA_VIEWS}, "
                             f"got {extra_views!r}")
        self.extra_views = extra_views
        if extra_views == "mcc" and self.crop is None:
            raise ValueError("train_cls: MCC's official views (methods.mcc.train_cls.views: "
                             "official) crop global view 2 to the training crop: set train_cls.crop, "
                             "or views: crop")
        if extra_views == "geometry" and (self.vflip or self.transpose):
            raise ValueError("train_cls: maps that follow the crop (extra_views geometry, SMAF's "
                             "teacher_targets: image) do not follow vflip / transpose: set both "
                             "false, or teacher_targets: crop")
        if extra_views == "base" and (not self.resize_square or self.crop is not None
                               or self.resize_long or tuple(self.scale_range) != (1.0, 1.0)):
            raise ValueError(
                "train_cls: an independent second view (methods.vitpcm.eq_view_source: base, the "
                "official form) is made from the square-resized image: it needs resize_square, "
                f"crop: null and scale_range [1, 1] (got resize_square {self.resize_square}, "
                f"crop {self.crop}, scale_range {list(self.scale_range)}, resize_long "
                f"{self.resize_long}); set eq_view_source: view1 for a cropping profile.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, i))
        iid = self.ids[i]
        image = load_image(self.root, iid)
        if self.resize_square:
            sq = self.resize_square
            image = np.asarray(Image.fromarray(image).resize((sq, sq), Image.BILINEAR))
        sr = self.scale_range
        if self.resize_long:
            target = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
            sr = (target / max(image.shape[:2]),) * 2
        if self.extra_views == "base":   # the same draws as below, the flip drawn here (base kept unflipped)
            base, _, _ = random_scale_crop(image, rng, None, sr, False)
            code = [bool(self.hflip and rng.random() < 0.5)]
            img = base[:, ::-1] if code[0] else base
        else:
            geo = {} if self.extra_views == "geometry" else None
            img, _, _ = random_scale_crop(image, rng, self.crop, sr, self.hflip, fill=self.mean,
                                          geometry=geo)
        extra = {}
        if self.extra_views == "geometry":
            extra["geometry"] = torch.tensor([i, *geo["scaled"], int(geo["flip"]), *geo["offset"]],
                                             dtype=torch.int64)
        if self.extra_views == "mcc":
            s1, s2, s3 = (int(v) for v in rng.integers(0, 2 ** 62, size=3))
            extra["global2"] = to_tensor(transforms.mcc_view(image, s2, 0.1, 0.2, self.crop),
                                         self.mean, self.std)
            extra["local"] = to_tensor(transforms.mcc_view(img, s3, 0.5), self.mean, self.std)
            img = transforms.mcc_view(img, s1, 1.0)
        if self.color_jitter is not None:
            img = transforms.color_jitter(img, rng, **self.color_jitter)
        vf = bool(self.vflip and rng.random() < 0.5)
        if vf:
            img = img[::-1]
        tr = bool(self.transpose and rng.random() < 0.5)
        if tr:
            img = img.transpose(1, 0, 2)
        y = labels_to_multihot(self.labels[iid], self.num_classes)
        if self.background_absent is not None:
            y = np.concatenate([[0.0 if iid in self.background_absent else 1.0], y]).astype(np.float32)
        x = to_tensor(img, self.mean, self.std)
        if self.extra_views == "base":
            if self.color_jitter is not None:
                base = transforms.color_jitter(base, rng, **self.color_jitter)
            extra = {"base": to_tensor(base, self.mean, self.std),
                     "base_code": torch.tensor(code + [vf, tr], dtype=torch.int64)}
        if self.extra_views is None:
            return x, torch.from_numpy(y), i
        return x, torch.from_numpy(y), i, extra
