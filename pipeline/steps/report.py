"""Figures and tables of one (dataset, method) chain for Snakemake's HTML report.

``snakemake --report report.html`` embeds every output marked with ``report(...)`` in the
Snakefile; this module draws them from the chain's artifacts (no torch / timm import, so a
report job costs ~2 s):

* :func:`plot_curves`: training losses vs iteration of train_cls / train_affinity / train_seg
  (``cls/metrics.json`` ``curve``, ``affinity|seg/metrics.json`` ``loss_curve``);
* :func:`iou_table_html`: per-class IoU of every evaluated stage (seeds, refined, pseudo
  labels, segmentation, own segmentation head) as one HTML table, with the extra columns of
  :func:`protocol_columns` (seeds / refined at the best threshold on GT, labelled official and
  not fair; segmentation single scale, MS + flip, MS + flip + CRF);
* :func:`draw_gallery`: a grid of fixed images (:func:`gallery_ids`: the first N sorted ids of
  a split, never chosen by score) with VOC-palette overlays (:func:`overlay`) and a legend of
  the classes present (:func:`legend_entries`).

Colours are the VOC colour map (:data:`pipeline.data.voc.VOC_PALETTE`); class names come from
the dataset manifest's ``classes`` when it has them, else :data:`pipeline.data.voc.VOC_CLASSES`.
Every writer goes through :func:`pipeline.io.storage.atomic_write` (``<path>.tmp`` then ``os.replace``), so an
interrupted job never leaves a half-written figure under its final name.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from pipeline.data.voc import IGNORE_INDEX, VOC_CLASSES, VOC_PALETTE
from pipeline.io.storage import atomic_write  # noqa: F401  (report.atomic_write: used by the CLI)

#: (key in the chain's metrics files, column title) of the evaluated stages, in DAG order
STAGE_COLUMNS = (("seeds", "seeds (CAM)"), ("refined", "refined (PSA RW)"),
                 ("pseudo", "pseudo labels (CRF)"), ("segmentation", "DeepLabV2 val"),
                 ("own_segmentation", "own seg head val"))


class ReportError(RuntimeError):
    """An input of the report is missing or malformed; the message names the file and the fix."""


def read_json(path: str | Path, producer: str) -> dict:
    """Load a JSON artifact; :class:`ReportError` naming the file and the rule that writes it."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p} is missing; build it first (`snakemake {p}`, rule {producer}).")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ReportError(f"{p} is not valid JSON ({e}); delete it and rerun rule {producer}.") from None


def class_names(manifest: dict) -> list[str]:
    """Class names of a dataset manifest: its ``classes`` list, else the 21 VOC names."""
    names = manifest.get("classes")
    return list(names) if names else list(VOC_CLASSES)


def gallery_ids(ids: Iterable[str], n: int) -> list[str]:
    """The first ``n`` ids in sorted order (fixed across runs and methods; never by score).

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"report.gallery_images must be >= 1, got {n}")
    return sorted(set(ids))[:n]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.6,
            palette: np.ndarray = VOC_PALETTE) -> np.ndarray:
    """Blend class colours over an image.

    Args:
        image: uint8 ``(H, W, 3)`` RGB.
        label: integer ``(H, W)`` class ids (0 = background, 255 = void).
        alpha: weight of the class colour, in [0, 1].
        palette: uint8 ``(256, 3)`` colour map (VOC's by default).
    Returns:
        uint8 ``(H, W, 3)``: ``(1 - alpha) * image + alpha * palette[label]`` at every pixel
        whose label is not 0 (void pixels get the void colour), the image elsewhere.
    Raises:
        ValueError: shapes differ or ``alpha`` outside [0, 1].
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.ndim != 3 or image.shape[2] != 3 or label.shape != image.shape[:2]:
        raise ValueError(f"overlay: image (H, W, 3) and label (H, W) must match, got "
                         f"{image.shape} and {label.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    out = image.astype(np.float32)
    m = label != 0
    col = palette[label[m].astype(np.int64)].astype(np.float32)
    out[m] = (1.0 - alpha) * out[m] + alpha * col
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A CAM (float ``(H, W)``, values in [0, 1]) as a jet heat map blended over ``image``
    (uint8 ``(H, W, 3)``); returns uint8 ``(H, W, 3)``."""
    from matplotlib import colormaps
    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    return np.clip(np.rint((1 - alpha) * image.astype(np.float32) + alpha * heat), 0, 255).astype(np.uint8)


def legend_entries(labels: Iterable[np.ndarray], names: Sequence[str],
                   palette: np.ndarray = VOC_PALETTE) -> list[tuple[int, str, tuple[int, int, int]]]:
    """``(class id, name, RGB colour)`` of every class drawn in ``labels``, sorted by id.

    Background (0) and void (255) are left out: :func:`overlay` does not colour them.
    Raises:
        ValueError: a label id has no name in ``names``.
    """
    present: set[int] = set()
    for lab in labels:
        present |= {int(v) for v in np.unique(np.asarray(lab))}
    present -= {0, IGNORE_INDEX}
    bad = sorted(c for c in present if c >= len(names))
    if bad:
        raise ValueError(f"label ids {bad} have no class name ({len(names)} names)")
    return [(c, names[c], tuple(int(x) for x in palette[c])) for c in sorted(present)]


def strongest_cam(maps: np.ndarray, class_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """The map of the class with the largest mean activation: ``(float (h, w), class id)``.

    Args:
        maps: float ``(k, h, w)`` CAMs in [0, 1] (seeds.h5 layout, :mod:`pipeline.io.storage`).
        class_ids: int ``(k,)``. With ``k == 0`` (no class) a zero map and id 0 are returned.
    """
    if len(class_ids) == 0:
        return np.zeros(maps.shape[1:], np.float32), 0
    i = int(np.argmax(maps.reshape(len(maps), -1).mean(1)))
    return maps[i], int(class_ids[i])


def label_from_maps(maps: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Per-pixel arg-max class id of ``maps`` (float ``(k, h, w)``, ``class_ids`` int ``(k,)``);
    uint8 ``(h, w)``, all background when ``k == 0``."""
    if len(class_ids) == 0:
        return np.zeros(maps.shape[1:], np.uint8)
    return np.asarray(class_ids, np.int64)[maps.argmax(0)].astype(np.uint8)


def resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ``(h, w)`` label or map to ``size`` = (H, W) (nearest for integers, bilinear
    for floats)."""
    if a.shape[:2] == tuple(size):
        return a
    if np.issubdtype(a.dtype, np.integer):
        return np.asarray(Image.fromarray(a.astype(np.uint8)).resize(size[::-1], Image.NEAREST))
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize(size[::-1], Image.BILINEAR))


def read_label_png(path: str | Path) -> np.ndarray:
    """A class-index PNG (pseudo label / prediction) as uint8 ``(H, W)``.

    Raises:
        ReportError: the file is missing (names the rule that writes it).
    """
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p} is missing; rerun the rule that writes its folder "
                          f"(make_pseudo_labels for pseudo/, eval_seg for predictions/).")
    with Image.open(p) as im:
        return np.asarray(im, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- figures


def _save_figure(fig, out: str | Path) -> Path:
    """``fig.savefig`` published with :func:`atomic_write`; the format is taken from ``out``'s
    suffix (the temporary ``<out>.tmp`` has none matplotlib knows)."""
    out = Path(out)
    return atomic_write(out, lambda t: fig.savefig(t, format=out.suffix[1:] or None))


def plot_curves(curves: dict[str, list[dict]], out: str | Path, title: str = "") -> Path:
    """One panel per training stage: ``loss`` (thick) and its logged components vs ``iter``.

    Args:
        curves: ``{stage name: [{"iter": i, "loss": x, <component>: y, ...}, ...]}``; a stage
            with an empty list is drawn as an empty panel saying so. ``lr`` is not plotted.
        out: figure path (``.png`` or ``.svg``).
    """
    from matplotlib.figure import Figure
    n = max(1, len(curves))
    fig = Figure(figsize=(4.2 * n, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (stage, rows) in zip(axes, curves.items()):
        ax.set_title(stage)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if not rows:
            ax.text(0.5, 0.5, "no curve logged", ha="center", va="center", transform=ax.transAxes)
            continue
        it = [r["iter"] for r in rows]
        keys = [k for k in rows[0] if k not in ("iter", "lr") and isinstance(rows[0][k], (int, float))]
        for k in sorted(keys, key=lambda k: k != "loss"):
            ax.plot(it, [r.get(k, np.nan) for r in rows], label=k,
                    lw=2.2 if k == "loss" else 1.0, marker="o" if len(it) < 12 else None, ms=3)
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out)


def draw_gallery(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], legend: list, out: str | Path,
                 title: str = "") -> Path:
    """A grid: one row per image id, one column per (panel title, uint8 ``(H, W, 3)``) of
    ``rows``, and a legend of ``legend`` (:func:`legend_entries`) below. A title
    ``"column: detail"`` heads the column with ``column`` and writes ``detail`` into that
    row's panel (e.g. the class of a CAM).

    Raises:
        ValueError: no row, or rows with different numbers of panels.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    if not rows:
        raise ValueError("draw_gallery: no image to draw")
    ncol = len(rows[0][1])
    if any(len(p) != ncol for _, p in rows):
        raise ValueError("draw_gallery: every row needs the same panels")
    fig = Figure(figsize=(2.0 * ncol, 2.0 * len(rows) + 0.9), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (image_id, panels) in enumerate(rows):
        for c, (name, img) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            head, _, tag = name.partition(":")
            if r == 0:
                ax.set_title(head, fontsize=9)
            if tag:                                    # per-image detail, e.g. the CAM's class
                ax.text(0.02, 0.98, tag.strip(), transform=ax.transAxes, va="top", ha="left",
                        fontsize=7, color="w", bbox={"facecolor": "k", "alpha": 0.6, "pad": 1.5})
            if c == 0:
                ax.set_ylabel(image_id, fontsize=8)
    handles = [Patch(facecolor=np.array(col) / 255.0, edgecolor="k", label=f"{cid} {name}")
               for cid, name, col in legend]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), max(2, ncol)), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out)


def _cell(v: float | None) -> str:
    if v is None:
        return "<td class='na'>–</td>"
    shade = int(round(255 - 120 * max(0.0, min(1.0, v))))
    return f"<td style='background:rgb({shade},255,{shade})'>{100 * v:.1f}</td>"


def iou_table_html(stages: dict[str, dict], names: Sequence[str], title: str) -> str:
    """A standalone HTML page: rows = classes (+ mIoU), one column per evaluated stage.

    Args:
        stages: ``{column title: {"iou": {class name: IoU in [0, 1]}, "miou": float}}``
            (the ``*miou.json`` files); a class a stage does not report shows "–".
        names: class names in class-id order.
    Returns:
        HTML text (IoU in %, cells shaded by value), embeddable as it is.
    """
    head = "".join(f"<th>{html.escape(t)}</th>" for t in stages)
    body = []
    for c, name in enumerate(names):
        cells = "".join(_cell((s.get("iou") or {}).get(name)) for s in stages.values())
        body.append(f"<tr><td>{c}</td><th class='l'>{html.escape(name)}</th>{cells}</tr>")
    body.append("<tr class='m'><td></td><th class='l'>mIoU</th>"
                + "".join(_cell(s.get("miou")) for s in stages.values()) + "</tr>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title)
            + "</title><style>body{font-family:sans-serif;font-size:13px}"
              "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:2px 8px;"
              "text-align:right}th.l{text-align:left}tr.m{font-weight:bold}td.na{color:#999}"
              "</style></head><body><h3>" + html.escape(title) + " — IoU (%) per class</h3>"
            "<table><tr><th>id</th><th class='l'>class</th>" + head + "</tr>"
            + "".join(body) + "</table></body></html>\n")


def comparison_html(c: dict) -> str:
    """The cross-method comparison (:func:`pipeline.steps.compare.comparison`) as a standalone HTML
    table (mIoU in %, one row per method)."""
    from pipeline.steps.compare import COLUMNS
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS)
    rows = "".join(
        f"<tr><th class='l'>{html.escape(r['method'])}</th>"
        + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in COLUMNS)
        + f"<td>{fmt(r.get('chain_minutes'))}</td></tr>" for r in c["rows"])
    foot = (f"<p>All-background prediction on val: {c['all_background']:.1f} mIoU.</p>"
            if "all_background" in c else "")
    from pipeline.steps.compare import PROTOCOL_COLUMNS, PROTOCOL_NOTE, protocol_cell
    foot += ("<h3>Evaluation protocols as papers report them: mIoU (%)</h3><table><tr>"
             "<th class='l'>method</th>"
             + "".join(f"<th>{html.escape(t)}</th>" for _, t in PROTOCOL_COLUMNS) + "</tr>"
             + "".join(f"<tr><th class='l'>{html.escape(r['method'])}</th>"
                       + "".join(f"<td>{html.escape(protocol_cell(r, k))}</td>"
                                 for k, _ in PROTOCOL_COLUMNS) + "</tr>" for r in c["rows"])
             + f"</table><p>{html.escape(PROTOCOL_NOTE)}</p>")
    t = f"{c['dataset']}: mIoU (%) per stage"
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(t)
            + "</title><style>body{font-family:sans-serif;font-size:13px}table{border-collapse:"
              "collapse}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
              "th.l{text-align:left}</style></head><body><h3>" + html.escape(t) + "</h3><table><tr>"
              "<th class='l'>method</th>" + head + "<th>chain (min)</th></tr>" + rows
            + "</table>" + foot + "</body></html>\n")


#: Column titles of the segmentation test protocols (``miou.json`` ``protocols``).
PROTOCOL_TITLES = {"single_scale": "single scale", "multi_scale_flip": "MS + flip",
                   "multi_scale_flip_crf": "MS + flip + CRF"}


def protocol_columns(key: str, title: str, d: dict) -> dict[str, dict]:
    """Extra IoU-table columns of one stage's metrics ``d``: the official best-threshold-on-GT
    scores of seeds / refined maps (labelled as not fair) and the segmentation test protocols
    (single scale, MS + flip, MS + flip + CRF), each ``{"iou", "miou"}``; ``{}`` when the
    file has none (pseudo labels: no sweep is defined for hard labels)."""
    out = {}
    b = d.get("best_threshold_on_gt") or {}
    if b.get("iou"):
        out[f"{title}, best τ on GT ({b['bg_threshold']:.2f}; official, not fair)"] = b
    for name, sub in PROTOCOL_TITLES.items():
        pr = (d.get("protocols") or {}).get(name)
        if pr and pr.get("iou"):
            out[f"{title}, {sub}"] = pr
    return out


# ----------------------------------------------------------------------------- one chain


def _stage_files(chain: Path) -> dict[str, Path]:
    return {"seeds": chain / "seeds_miou.json", "refined": chain / "refined_miou.json",
            "pseudo": chain / "pseudo_miou.json", "segmentation": chain / "miou.json",
            "own_segmentation": chain / "own_seg_miou.json"}


def chain_report(manifest_path: str | Path, chain: str | Path, out_dir: str | Path,
                 n_images: int, label: str = "") -> dict[str, Path]:
    """Draw every report figure of one chain (``results/{dataset}/{method}``).

    Writes into ``out_dir``: ``curves.png`` (:func:`plot_curves`), ``iou.html``
    (:func:`iou_table_html`), ``gallery_train.png`` (image | ground truth | CAM of the
    strongest class | refined arg-max | pseudo label, first ``n_images`` sorted eval_train
    ids) and ``gallery_val.png`` (image | ground truth | prediction, first sorted val ids).

    Raises:
        ReportError: a needed artifact is missing or malformed (named, with its rule).
        pipeline.data.voc.DatasetError: an image or mask of the dataset is missing.
        pipeline.io.storage.StorageError: seeds.h5 / refined.h5 missing an image.
    Returns:
        ``{"curves": path, "iou": path, "gallery_train": path, "gallery_val": path}``.
    """
    from pipeline.data.voc import load_image, load_mask
    from pipeline.io.storage import MapReader
    chain, out_dir = Path(chain), Path(out_dir)
    man = read_json(manifest_path, "prepare_dataset")
    names = class_names(man)
    label = label or f"{chain.parent.name} / {chain.name}"
    done: dict[str, Path] = {}

    curves = {}
    for stage, f, key in (("train_cls", "cls/metrics.json", "curve"),
                          ("train_affinity", "affinity/metrics.json", "loss_curve"),
                          ("train_seg", "seg/metrics.json", "loss_curve")):
        curves[stage] = read_json(chain / f, stage).get(key) or []
    done["curves"] = plot_curves(curves, out_dir / "curves.png", f"{label}: training losses")

    stages = {}
    for (key, title), f in zip(STAGE_COLUMNS, _stage_files(chain).values()):
        if f.is_file():
            d = read_json(f, key)
            if d.get("iou"):
                stages[title] = d
            stages.update(protocol_columns(key, title, d))
    if not stages:
        raise ReportError(f"{chain} has no evaluated stage (seeds_miou.json ... miou.json); "
                          f"build `snakemake {chain}/miou.json` first.")
    text = iou_table_html(stages, names, label)
    done["iou"] = atomic_write(out_dir / "iou.html", lambda t: t.write_text(text, encoding="utf-8"))

    root, label_dir = man["root"], man.get("label_dir", "SegmentationClass")
    refined_key = read_json(chain / "refined_miou.json", "refine_seeds").get("key") or "probs"
    rows, labels = [], []
    with MapReader(chain / "seeds.h5") as seeds, MapReader(chain / "refined.h5") as refined:
        seed_key = "cams" if "cams" in seeds.keys(seeds.ids[0]) else seeds.keys(seeds.ids[0])[0]
        for i in gallery_ids(man["splits"]["eval_train"], n_images):
            img, gt = load_image(root, i), load_mask(root, i, label_dir)
            hw = gt.shape
            maps, cids, _ = seeds.read(i, seed_key)
            cam, cid = strongest_cam(maps, cids)
            rmaps, rcids, _ = refined.read(i, refined_key)
            ref = resize_nearest(label_from_maps(rmaps, rcids), hw)
            pseudo = resize_nearest(read_label_png(chain / "pseudo" / f"{i}.png"), hw)
            labels += [gt, ref, pseudo]
            rows.append((i, [("image", img), ("ground truth", overlay(img, gt)),
                             (f"CAM (strongest class): {names[cid] if cid < len(names) else cid}",
                              heatmap(img, resize_nearest(cam, hw))),
                             ("refined", overlay(img, ref)), ("pseudo label", overlay(img, pseudo))]))
    done["gallery_train"] = draw_gallery(rows, legend_entries(labels, names),
                                         out_dir / "gallery_train.png", f"{label}: train images")

    rows, labels = [], []
    for i in gallery_ids(man["splits"]["val"], n_images):
        img, gt = load_image(root, i), load_mask(root, i, label_dir)
        pred = resize_nearest(read_label_png(chain / "predictions" / f"{i}.png"), gt.shape)
        labels += [gt, pred]
        rows.append((i, [("image", img), ("ground truth", overlay(img, gt)),
                         ("prediction", overlay(img, pred))]))
    done["gallery_val"] = draw_gallery(rows, legend_entries(labels, names),
                                       out_dir / "gallery_val.png", f"{label}: val images")
    return done
