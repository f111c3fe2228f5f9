"""Synthetic "demo" dataset in the exact PASCAL VOC 2012 layout, deterministic from a seed.

It exists so that the whole WSSS chain (classifier trained from image-level labels only, CAM
seeds, affinity refinement, CRF, DeepLab) can run end to end on 2 CPU cores in minutes and
*visibly work*: images are small and the 20 object classes are easy to tell apart from
image-level labels alone, while the background is cluttered enough that "anything that is not
flat" is not a good seed.

Each of the 20 object classes (ids 1..20, mapped onto the VOC class names so that the rest of the
pipeline is unchanged) has three redundant cues:

* a distinct **colour**: the 3-level RGB lattice {45, 128, 210}^3 without its grey diagonal, so any
  two class colours are >= 83 apart in RGB and all are far from the grey axis (chroma >= 83);
* a distinct **shape** (circle, square, triangle, rhombus, star, ...);
* a **texture**: lightness-only modulation (stripes / checker / dots / rings / solid with a
  class-specific period and orientation), symmetric around the class colour so that the mean
  colour of an object stays its class colour.

The background (class 0) is a smooth neutral colour gradient with low-contrast low-frequency and
pixel noise, plus a few small neutral (grey, low-saturation) distractor blobs and lines that stay
background. Objects (1..3 per image by default, distinct classes, class sampling balanced over
each split) get a random size (22-45 % of the image side), position, rotation and a mild colour
jitter; they may overlap partly (later ones on top, every object keeps >= 55 % of its area
visible) and the mask holds exactly the visible pixels of each object.

Layout written under ``root``::

    JPEGImages/demo_00000.jpg             RGB, JPEG quality 95, 4:4:4 (no chroma subsampling)
    SegmentationClass/demo_00000.png      VOC palette PNG, 0 = background, 1..20, 255 = void
    ImageSets/Segmentation/{train,val,trainval}.txt
    README.txt                            generator parameters and the class table
    .complete                             JSON marker (params + summary), written last

Command line: ``python -m pipeline.data.demo ROOT [--num-train N ...] [--preview PNG]``.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.random import PCG64, Generator, SeedSequence
from PIL import Image

from pipeline.data.voc import (IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, VOC_PALETTE, image_labels,
                               load_image, load_mask, read_ids, save_mask_png)
from pipeline.storage import atomic_directory, atomic_write

GENERATOR_VERSION = 1
ID_PREFIX = "demo_"
MARKER = ".complete"
JPEG_QUALITY = 95

SIZE_RANGE = (0.22, 0.45)      # object extent (diameter of its unit disk) / image side
TEXTURE_AMPLITUDE = 26.0       # +- lightness offset of the textures (all channels alike)
JITTER = 8.0                   # +- per-channel colour offset per object
GAIN_RANGE = (0.95, 1.05)      # per-object colour gain
MIN_VISIBLE = 0.55             # every object keeps at least this fraction of its area visible
SENSOR_NOISE = 2.0             # std of the final per-pixel noise (whole image)


# --------------------------------------------------------------------------- shapes
# Each shape is an implicit function of local, rotated, radius-normalised coordinates (u, v)
# (the object fits (roughly) in the unit disk) returning a boolean mask. All vectorised.

def _regular_polygon(n: int, circumradius: float = 0.95) -> Callable:
    apothem = circumradius * math.cos(math.pi / n)
    sector = 2 * math.pi / n

    def f(u, v):
        r = np.hypot(u, v)
        phi = np.mod(np.arctan2(v, u) + math.pi / 2, sector) - sector / 2  # a vertex points up
        return r * np.cos(phi) <= apothem
    return f


def _star(u, v, points: int = 5, outer: float = 1.0, inner: float = 0.45):
    r = np.hypot(u, v)
    sector = 2 * math.pi / points
    a = np.abs(np.mod(np.arctan2(v, u) + math.pi / 2, sector) - sector / 2) / (sector / 2)
    return r <= outer * (1 - a) + inner * a


def _heart(u, v):
    x, y = 1.2 * u, -1.2 * v + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def _box(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 0.9 ** 2,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.7,
    "triangle": _regular_polygon(3, 1.0),
    "rhombus": lambda u, v: np.abs(u) / 0.95 + np.abs(v) / 0.55 <= 1,
    "star": _star,
    "latin-cross": lambda u, v: _box(u, v, -0.18, 0.18, -0.9, 0.9) | _box(u, v, -0.6, 0.6, -0.5, -0.15),
    "ring": lambda u, v: (u * u + v * v <= 0.95 ** 2) & (u * u + v * v >= 0.5 ** 2),
    "hexagon": _regular_polygon(6),
    "ellipse": lambda u, v: (u / 0.95) ** 2 + (v / 0.5) ** 2 <= 1,
    "bars": lambda u, v: (np.abs(v) <= 0.85) & ((np.abs(u) <= 0.15) | (np.abs(np.abs(u) - 0.58) <= 0.15)),
    "L-shape": lambda u, v: _box(u, v, -0.7, -0.2, -0.8, 0.8) | _box(u, v, -0.7, 0.7, 0.3, 0.8),
    "crescent": lambda u, v: (u * u + v * v <= 0.95 ** 2) & ((u - 0.42) ** 2 + v * v > 0.72 ** 2),
    "heart": _heart,
    "arrow": lambda u, v: _box(u, v, -0.9, 0.15, -0.2, 0.2) | ((u >= 0.05) & (np.abs(v) <= (0.95 - u) * 0.8)),
    "T-shape": lambda u, v: _box(u, v, -0.8, 0.8, -0.8, -0.38) | _box(u, v, -0.21, 0.21, -0.8, 0.8),
    "pentagon": _regular_polygon(5),
    "trapezoid": lambda u, v: (np.abs(v) <= 0.6) & (np.abs(u) <= 0.7 + 0.42 * v),
    "plus": lambda u, v: _box(u, v, -0.3, 0.3, -0.85, 0.85) | _box(u, v, -0.85, 0.85, -0.3, 0.3),
    "half-disk": lambda u, v: (u * u + (v + 0.4) ** 2 <= 1.0) & (v >= -0.4),
    "frame": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.78) & (np.maximum(np.abs(u), np.abs(v)) >= 0.45),
}


# --------------------------------------------------------------------------- class table
@dataclass(frozen=True)
class ClassSpec:
    """Appearance of one synthetic object class.

    Attributes:
        class_id: 1..20 (index into ``VOC_CLASSES``).
        shape: key of ``SHAPES``.
        color: base RGB colour, ints in [45, 210].
        color_name: human-readable colour name (README only).
        texture: one of ``solid``, ``stripes``, ``checker``, ``dots``, ``rings``.
        period: texture period in pixels (ignored for ``solid``).
        angle: stripe orientation in degrees, relative to the object's own frame.
    """
    class_id: int
    shape: str
    color: tuple[int, int, int]
    color_name: str
    texture: str
    period: float = 0.0
    angle: float = 0.0


_L, _M, _H = 45, 128, 210
CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec(1, "circle", (_H, _L, _L), "red", "solid"),
    ClassSpec(2, "square", (_L, _L, _H), "blue", "checker", 8),
    ClassSpec(3, "triangle", (_H, _H, _L), "yellow", "stripes", 6, 0),
    ClassSpec(4, "rhombus", (_L, _H, _L), "green", "dots", 7),
    ClassSpec(5, "star", (_H, _L, _H), "magenta", "solid"),
    ClassSpec(6, "latin-cross", (_L, _H, _H), "cyan", "stripes", 4, 90),
    ClassSpec(7, "ring", (_H, _M, _L), "orange", "stripes", 8, 45),
    ClassSpec(8, "hexagon", (_M, _L, _H), "violet", "checker", 4),
    ClassSpec(9, "ellipse", (_L, _H, _M), "spring green", "rings", 6),
    ClassSpec(10, "bars", (_H, _L, _M), "rose", "solid"),
    ClassSpec(11, "L-shape", (_M, _H, _L), "chartreuse", "stripes", 6, 135),
    ClassSpec(12, "crescent", (_L, _M, _H), "azure", "dots", 5),
    ClassSpec(13, "heart", (_M, _L, _L), "maroon", "solid"),
    ClassSpec(14, "arrow", (_L, _M, _L), "dark green", "stripes", 5, 0),
    ClassSpec(15, "T-shape", (_M, _M, _H), "periwinkle", "checker", 6),
    ClassSpec(16, "pentagon", (_L, _M, _M), "teal", "rings", 4),
    ClassSpec(17, "trapezoid", (_H, _H, _M), "pale yellow", "stripes", 8, 90),
    ClassSpec(18, "plus", (_H, _M, _H), "orchid", "dots", 8),
    ClassSpec(19, "half-disk", (_L, _L, _M), "navy", "stripes", 4, 45),
    ClassSpec(20, "frame", (_M, _H, _M), "light green", "checker", 5),
)
CLASS_COLORS = np.array([s.color for s in CLASS_SPECS], dtype=np.float64)  # (20, 3), row c-1


def class_colors() -> np.ndarray:
    """Base RGB colour of every class: float64 ``(NUM_CLASSES, 3)``; row 0 (background) is NaN."""
    out = np.full((NUM_CLASSES, 3), np.nan)
    out[1:] = CLASS_COLORS
    return out


# --------------------------------------------------------------------------- rendering
def _texture(spec: ClassSpec, du: np.ndarray, dv: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Zero-mean lightness offset in units of the amplitude, values in about [-1, 1]."""
    p = spec.period
    if spec.texture == "solid":
        return np.zeros_like(du)
    if spec.texture == "rings":   # concentric around the object centre (no phase)
        return np.where(np.mod(np.hypot(du, dv), p) < p / 2, 1.0, -1.0)
    a, b = du + phase[0] * p, dv + phase[1] * p
    if spec.texture == "stripes":
        t = math.radians(spec.angle)
        w = a * math.cos(t) + b * math.sin(t)
        return np.where(np.mod(w, p) < p / 2, 1.0, -1.0)
    if spec.texture == "checker":
        return np.where(np.mod(np.floor(a / p) + np.floor(b / p), 2) == 0, 1.0, -1.0)
    if spec.texture == "dots":    # dots of radius 0.4 p cover pi * 0.16 ~ 50.3 % of the area
        duty = math.pi * 0.16
        inside = (np.mod(a, p) - p / 2) ** 2 + (np.mod(b, p) - p / 2) ** 2 < (0.4 * p) ** 2
        return np.where(inside, 2 * (1 - duty), -2 * duty)
    raise ValueError(f"unknown texture {spec.texture!r}")


def _smooth_field(rng: Generator, size: int, grid: int, channels: int) -> np.ndarray:
    """Bilinear upsampling of a ``(grid, grid, channels)`` N(0,1) lattice to ``(size, size, ch)``."""
    g = rng.standard_normal((grid, grid, channels))
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    w = pos - i0
    interp = np.zeros((size, grid))
    interp[np.arange(size), i0] = 1 - w
    interp[np.arange(size), i0 + 1] = w
    rows = np.tensordot(interp, g, axes=(1, 0))                 # (size, grid, channels)
    return np.tensordot(rows, interp, axes=(1, 1)).transpose(0, 2, 1)


def _neutral(rng: Generator, lo: float, hi: float, tint: float) -> np.ndarray:
    return rng.uniform(lo, hi) + rng.uniform(-tint, tint, 3)


def _render_background(rng: Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    c0, c1 = _neutral(rng, 85, 175, 12), _neutral(rng, 85, 175, 12)
    t = rng.uniform(0, 2 * math.pi)
    proj = (xx - size / 2) * math.cos(t) + (yy - size / 2) * math.sin(t)
    ramp = (proj / (size * 0.75) + 0.5)[..., None]
    img = c0 + (c1 - c0) * ramp
    img += 6.0 * _smooth_field(rng, size, 5, 3)          # low-frequency, low-contrast clutter
    img += 3.0 * rng.standard_normal((size, size, 3))   # fine grain
    # distractors: small neutral blobs and thin lines (background class)
    for _ in range(int(rng.integers(2, 7))):
        cy, cx = rng.uniform(0, size, 2)
        ra, rb = rng.uniform(1.5, max(2.0, 0.08 * size), 2)
        th = rng.uniform(0, math.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(th) + dy * math.sin(th)) / ra
        v = (-dx * math.sin(th) + dy * math.cos(th)) / rb
        img[u * u + v * v <= 1] = _neutral(rng, 30, 230, 8)
    for _ in range(int(rng.integers(1, 4))):
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        width = rng.uniform(0.8, 2.0)
        d = p1 - p0
        s = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
        dist = np.hypot(xx - (p0[0] + s * d[0]), yy - (p0[1] + s * d[1]))
        img[dist <= width / 2] = _neutral(rng, 30, 230, 8)
    return img


def render_sample(rng: Generator, class_ids, size: int = 96, void_border: bool = False,
                  noise: bool = True) -> dict:
    """Render one synthetic image and its exact mask.

    Args:
        rng: numpy ``Generator``; the result is a pure function of its state.
        class_ids: distinct object class ids in 1..20, drawn in this order (later on top).
        size: image side in pixels (>= 32).
        void_border: mark a 1-px ring (255) around every object's visible region: on the
            background and on the objects it covers, like the VOC boundary band.
        noise: add the final per-pixel sensor noise (std ``SENSOR_NOISE``). With ``noise=False``
            an object pixel equals ``round(color + k)`` with the same lightness offset ``k``
            on all three channels (``color`` as reported in ``objects``), never clipped.

    Returns:
        dict with ``image`` uint8 ``(size, size, 3)`` RGB, ``mask`` uint8 ``(size, size)``
        (0 background, class ids, 255 void if ``void_border``) and ``objects``: one dict per
        object (``class_id``, ``center`` (x, y), ``radius``, ``angle`` (rad), ``color`` the
        jittered RGB colour float, ``area`` full area in px, ``visible`` visible px).

    Raises:
        ValueError: a class id outside 1..20, repeated ids, or ``size < 32``.
    """
    class_ids = [int(c) for c in class_ids]
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if any(not 1 <= c <= 20 for c in class_ids) or len(set(class_ids)) != len(class_ids):
        raise ValueError(f"class_ids must be distinct ids in 1..20, got {class_ids}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img = _render_background(rng, size, yy, xx)
    mask = np.zeros((size, size), dtype=np.uint8)
    objects: list[dict] = []
    for c in class_ids:
        spec = CLASS_SPECS[c - 1]
        best = None
        for _attempt in range(30):
            radius = rng.uniform(*SIZE_RANGE) * size / 2
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            ang = rng.uniform(0, 2 * math.pi)
            dx, dy = xx - cx, yy - cy
            du = dx * math.cos(ang) + dy * math.sin(ang)
            dv = -dx * math.sin(ang) + dy * math.cos(ang)
            m = SHAPES[spec.shape](du / radius, dv / radius)
            if not m.any():
                continue
            # worst visible fraction of the objects already drawn if this one goes on top
            worst = min((np.count_nonzero((mask == o["class_id"]) & ~m) / o["area"]
                         for o in objects), default=1.0)
            if best is None or worst > best[0]:
                best = (worst, radius, cx, cy, ang, du, dv, m)
            if worst >= MIN_VISIBLE:
                break
        _, radius, cx, cy, ang, du, dv, m = best
        color = (np.asarray(spec.color, float) * rng.uniform(*GAIN_RANGE)
                 + rng.uniform(-JITTER, JITTER, 3))
        offset = TEXTURE_AMPLITUDE * _texture(spec, du, dv, rng.uniform(0, 1, 2))
        img[m] = color + offset[m][:, None]
        mask[m] = c
        objects.append(dict(class_id=c, center=(float(cx), float(cy)), radius=float(radius),
                            angle=float(ang), color=color, area=int(np.count_nonzero(m))))
    for o in objects:
        o["visible"] = int(np.count_nonzero(mask == o["class_id"]))
    if noise:
        img += SENSOR_NOISE * rng.standard_normal(img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if void_border:
        mask = _add_void_border(mask, [o["class_id"] for o in objects])
    return dict(image=image, mask=mask, objects=objects)


def _dilate4(m: np.ndarray) -> np.ndarray:
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    return d


def _add_void_border(mask: np.ndarray, order: list[int]) -> np.ndarray:
    """1-px 255 ring outside each object's visible region, on background and lower objects."""
    out = mask.copy()
    for j, c in enumerate(order):
        region = mask == c
        ring = _dilate4(region) & ~region
        below = np.isin(mask, [0] + order[:j])
        out[ring & below] = IGNORE_INDEX
    return out


# --------------------------------------------------------------------------- class sampling
def _assign_classes(rng: Generator, n: int, kmin: int, kmax: int) -> list[list[int]]:
    """Distinct classes per image, balanced over the split (stream of random permutations).

    Every class appears at least once when the split holds >= 20 objects in total.
    """
    ks = rng.integers(kmin, kmax + 1, n)
    pool: list[int] = []
    out = []
    for k in ks:
        picked: list[int] = []
        i = 0
        while len(picked) < k:
            if i >= len(pool):
                pool.extend((rng.permutation(20) + 1).tolist())
            if pool[i] not in picked:
                picked.append(pool.pop(i))
            else:
                i += 1
        out.append(picked)
    # repair coverage (rarely needed): swap a missing class in for an over-represented one
    counts = np.bincount([c for p in out for c in p], minlength=21)
    for c in (int(x) for x in np.flatnonzero(counts[1:] == 0) + 1):
        for p in out:
            donors = [d for d in p if counts[d] > 1]
            if donors:
                d = max(donors, key=lambda x: counts[x])
                p[p.index(d)] = c
                counts[d] -= 1
                counts[c] += 1
                break
    return out


# --------------------------------------------------------------------------- dataset
def _params(num_train, num_val, size, seed, min_objects, max_objects, void_border) -> dict:
    return dict(generator_version=GENERATOR_VERSION, num_train=int(num_train),
                num_val=int(num_val), size=int(size), seed=int(seed),
                min_objects=int(min_objects), max_objects=int(max_objects),
                void_border=bool(void_border), jpeg_quality=JPEG_QUALITY)


def _readme(params: dict, summary: dict) -> str:
    lines = [
        "Synthetic WSSS demo dataset (PASCAL VOC 2012 layout), written by pipeline/data/demo.py",
        "",
        "Generator parameters:",
        *[f"  {k} = {v}" for k, v in params.items()],
        f"  object size = {SIZE_RANGE[0]:.0%}..{SIZE_RANGE[1]:.0%} of the image side, random "
        f"position / rotation, colour gain {GAIN_RANGE}, jitter +-{JITTER:g}/channel",
        f"  texture amplitude = +-{TEXTURE_AMPLITUDE:g} (lightness only, zero mean), "
        f"sensor noise std = {SENSOR_NOISE:g}",
        f"  overlap: later objects on top, each keeps >= {MIN_VISIBLE:.0%} of its area visible",
        "  background: neutral colour gradient + low-frequency and pixel noise + neutral",
        "  distractor blobs/lines (all class 0)",
        "",
        f"Images: {summary['num_train']} train + {summary['num_val']} val "
        f"(ids demo_00000.. train first), {params['size']}x{params['size']} px, "
        f"JPEG quality {JPEG_QUALITY} 4:4:4; masks: VOC palette PNG, 0 background, "
        f"1..20 objects" + (", 255 void 1-px ring" if params["void_border"] else "") + ".",
        "Image-level labels are the class ids present in each mask.",
        "",
        "Classes (id, VOC name reused, shape, colour RGB, texture, #train/#val images):",
    ]
    for s in CLASS_SPECS:
        tex = s.texture if s.texture == "solid" else (
            f"{s.texture} p={s.period:g}px" + (f" {s.angle:g}deg" if s.texture == "stripes" else ""))
        lines.append(f"  {s.class_id:2d} {VOC_CLASSES[s.class_id]:<12} {s.shape:<12} "
                     f"{s.color_name:<13} {str(s.color):<16} {tex:<20} "
                     f"{summary['class_images']['train'][s.class_id]:4d}/"
                     f"{summary['class_images']['val'][s.class_id]:d}")
    return "\n".join(lines) + "\n"


def _is_complete(root: Path, params: dict) -> dict | None:
    marker = root / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("params") == params and "summary" in data:
        return data["summary"]
    return None


def make_demo_dataset(root: str | Path, num_train: int = 160, num_val: int = 48, size: int = 96,
                      seed: int = 0, min_objects: int = 1, max_objects: int = 3,
                      void_border: bool = False) -> dict:
    """Write the synthetic demo dataset under ``root`` (VOC 2012 layout), atomically.

    The dataset is built in the sibling folder ``<root>.tmp`` and renamed to ``root`` at the end
    (:func:`pipeline.storage.atomic_directory`; on a failure ``<root>.tmp`` is removed).
    If ``root`` already holds a complete dataset made with the same parameters (its
    ``.complete`` marker), nothing is written. A ``root`` made with other parameters, or one
    holding no file at all (only empty folders), is replaced.

    Args:
        root: dataset folder (created, with its parents).
        num_train, num_val: number of images of each split (>= 1). Ids are ``demo_00000`` ...,
            train first, then val; ``trainval.txt`` lists both.
        size: image side in pixels (>= 32). Images are RGB ``(size, size, 3)`` JPEGs.
        seed: generator seed; identical arguments give byte-identical files.
        min_objects, max_objects: objects per image, 1 <= min <= max <= 6; each image holds
            distinct classes. Every class 1..20 appears in a split whose object total is >= 20
            (always the case when ``num * min_objects >= 20``).
        void_border: add a 1-px 255 ring around objects in the masks (like VOC boundaries).

    Returns:
        Summary dict: ``root`` (str), ``regenerated`` (bool: files were written by this call),
        ``num_train``, ``num_val``, ``num_images``, ``size``, ``seed``, ``num_objects``,
        ``objects_per_image`` ({"1": n, ...}), ``class_images`` ({"train"/"val": list of 21
        ints, images containing each class id; index 0 = images with visible background}),
        ``class_pixel_fraction`` (list of 21 floats over all images, void excluded).

    Raises:
        ValueError: invalid argument.
        FileExistsError: ``root`` holds files that are not a demo dataset (never deleted).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if not 1 <= min_objects <= max_objects <= 6:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, "
                         f"got {min_objects}, {max_objects}")
    root = Path(root)
    params = _params(num_train, num_val, size, seed, min_objects, max_objects, void_border)
    summary = _is_complete(root, params)
    if summary is not None:
        return {**summary, "root": str(root), "regenerated": False}
    if root.exists() and not (root / MARKER).exists() and any(
            p.is_file() or p.is_symlink() for p in root.rglob("*")):
        raise FileExistsError(f"{root} exists and is not a demo dataset (no {MARKER} marker); "
                              f"remove it or choose another root")

    try:
        with atomic_directory(root) as tmp:
            (tmp / "JPEGImages").mkdir()
            (tmp / "SegmentationClass").mkdir()
            (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)

            seeds = SeedSequence(seed).spawn(3 + num_train + num_val)
            splits = {"train": _assign_classes(Generator(PCG64(seeds[0])), num_train, min_objects,
                                               max_objects),
                      "val": _assign_classes(Generator(PCG64(seeds[1])), num_val, min_objects,
                                             max_objects)}
            ids: dict[str, list[str]] = {"train": [], "val": []}
            class_images = {"train": [0] * NUM_CLASSES, "val": [0] * NUM_CLASSES}
            pixels = np.zeros(256, dtype=np.int64)
            per_image: dict[str, int] = {}
            idx = 0
            for split in ("train", "val"):
                for classes in splits[split]:
                    rng = Generator(PCG64(seeds[3 + idx]))
                    s = render_sample(rng, classes, size, void_border)
                    iid = f"{ID_PREFIX}{idx:05d}"
                    Image.fromarray(s["image"], mode="RGB").save(
                        tmp / "JPEGImages" / f"{iid}.jpg", quality=JPEG_QUALITY, subsampling=0)
                    save_mask_png(tmp / "SegmentationClass" / f"{iid}.png", s["mask"])
                    ids[split].append(iid)
                    present = np.unique(s["mask"])
                    for c in present[present < NUM_CLASSES]:
                        class_images[split][int(c)] += 1
                    pixels += np.bincount(s["mask"].ravel(), minlength=256)
                    k = str(len(image_labels(s["mask"])))
                    per_image[k] = per_image.get(k, 0) + 1
                    idx += 1
            seg = tmp / "ImageSets" / "Segmentation"
            (seg / "train.txt").write_text("\n".join(ids["train"]) + "\n")
            (seg / "val.txt").write_text("\n".join(ids["val"]) + "\n")
            (seg / "trainval.txt").write_text("\n".join(ids["train"] + ids["val"]) + "\n")
            valid = pixels[:NUM_CLASSES]
            summary = dict(num_train=num_train, num_val=num_val, num_images=num_train + num_val,
                           size=size, seed=seed,
                           num_objects=int(sum(len(c) for sp in splits.values() for c in sp)),
                           objects_per_image=dict(sorted(per_image.items())),
                           class_images=class_images,
                           class_pixel_fraction=[round(float(x), 6) for x in valid / valid.sum()])
            (tmp / "README.txt").write_text(_readme(params, summary))
            (tmp / MARKER).write_text(json.dumps({"params": params, "summary": summary},
                                                 indent=1, sort_keys=True) + "\n")
    except OSError:
        # another process published the same dataset first (ours is already removed)
        done = _is_complete(root, params)
        if done is None:
            raise
        summary = done
    return {**summary, "root": str(root), "regenerated": True}


# --------------------------------------------------------------------------- preview / CLI
def save_preview(root: str | Path, out: str | Path, n: int = 8, split: str = "train") -> Path:
    """Save a mosaic of the first ``n`` images of ``split`` (top row) and their coloured masks
    (bottom row, VOC palette) as a PNG (or the format of ``out``'s suffix), published with
    :func:`pipeline.storage.atomic_write`; returns ``Path(out)``.

    Raises:
        DatasetError: missing split file / image / mask.
        ValueError: ``out`` has a suffix PIL cannot write.
    """
    ids = read_ids(Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt")[:n]
    imgs = [load_image(root, i) for i in ids]
    masks = [VOC_PALETTE[load_mask(root, i)] for i in ids]
    gap = np.full((imgs[0].shape[0], 2, 3), 255, np.uint8)

    def row(xs):
        return np.concatenate([a for x in xs for a in (x, gap)][:-1], axis=1)

    top, bottom = row(imgs), row(masks)
    sep = np.full((2, top.shape[1], 3), 255, np.uint8)
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())   # the temporary ends in .tmp
    if fmt is None:
        raise ValueError(f"unknown file extension: {out.suffix!r}")
    mosaic = Image.fromarray(np.concatenate([top, sep, bottom], axis=0))
    return atomic_write(out, lambda t: mosaic.save(t, format=fmt))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    ap.add_argument("--num-train", type=int, default=160)
    ap.add_argument("--num-val", type=int, default=48)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--void-border", action="store_true")
    ap.add_argument("--preview", default=None, help="also save a mosaic PNG of 8 train images")
    a = ap.parse_args(argv)
    summary = make_demo_dataset(a.root, a.num_train, a.num_val, a.size, a.seed,
                                a.min_objects, a.max_objects, a.void_border)
    if a.preview:
        save_preview(a.root, a.preview)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
