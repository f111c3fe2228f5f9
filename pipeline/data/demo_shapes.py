"""Appearance of the synthetic demo dataset (:mod:`pipeline.data.demo` writes it): the 20 class
specs, the shape functions and the renderer of one image + exact mask, deterministic from a
numpy ``Generator``.

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
background. Objects (distinct classes; :func:`render_sample`) get a random size (22-45 % of the
image side), position, rotation and a mild colour jitter; they may overlap partly (later ones on
top, every object keeps >= 55 % of its area visible) and the mask holds exactly the visible
pixels of each object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from numpy.random import Generator

from pipeline.data.voc import IGNORE_INDEX, NUM_CLASSES

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
