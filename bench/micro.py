"""Side-by-side micro benchmarks: the pipeline's implementation vs the straightforward one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import dataset_ids, target, timeit


def crf_pool(dataset: str) -> dict:
    """Dense CRF pseudo labels over images: process pool (2 workers) vs one process."""
    from pipeline.data.voc import load_image
    from pipeline.io.storage import MapWriter
    from pipeline.data.voc import VOC_CLASSES
    root, ids, _ = dataset_ids(dataset, "train")
    ids = ids[:46]
    rng = np.random.default_rng(0)
    crf = {"gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 80, "bilateral_srgb": 13,
           "bilateral_compat": 10, "iters": 10}
    with tempfile.TemporaryDirectory() as td:
        h5 = Path(td) / "maps.h5"
        with MapWriter(h5, VOC_CLASSES) as w:
            for iid in ids:
                h, wd = load_image(root, iid).shape[:2]
                m = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))),
                                                    size=(h, wd), mode="bilinear")[0].numpy()
                w.write(iid, np.array([0, 5, 12]), (h, wd), probs=m)
        res = {}
        for workers in (1, 2):
            # a fresh interpreter per run, as the stage CLI runs (spawned workers re-import
            # the main module; this one must not be the torch-importing bench)
            code = ("import sys, json; from pipeline.steps.pseudo import make_pseudo_labels; "
                    "a = json.loads(sys.argv[1]); "
                    "make_pseudo_labels(a['h5'], 'probs', a['root'], a['ids'], {'crf': a['crf']}, "
                    "a['out'], workers=a['w'], log=lambda s: None)")
            arg = json.dumps({"h5": str(h5), "root": str(root), "ids": ids, "crf": crf,
                              "out": str(Path(td) / f"out{workers}"), "w": workers})
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, arg], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            res[workers] = time.perf_counter() - t0
        same = all((Path(td) / "out1" / f"{i}.png").read_bytes() == (Path(td) / "out2" / f"{i}.png").read_bytes()
                   for i in ids)
    ratio = res[1] / res[2]
    return {"images": len(ids), "seconds_1_process": round(res[1], 2),
            "seconds_2_workers": round(res[2], 2), "images_per_s_2_workers": round(len(ids) / res[2], 2),
            "identical_output": same,
            "targets": [target("dense CRF pool (2 workers) vs 1 process", ratio, 1.8, "x")],
            "summary": f"{ratio:.2f}x with 2 workers ({len(ids)} images, identical={same})"}


def random_walk(dataset: str) -> dict:
    """PSA random walk: sparse local affinity (repeated multiplication) vs dense T^(2^logt)."""
    from pipeline.steps.refine.random_walk import random_walk as rw_sparse, random_walk_dense
    torch.manual_seed(0)
    out = {}
    for hw in ((48, 48), (64, 48)):   # 64x48: a 500x375 VOC image at PSA's stride 8
        f = torch.rand(32, *hw)
        maps = torch.rand(4, *hw)
        ts, a = timeit(lambda: rw_sparse(f, maps, 5, 8, 8), repeat=3)
        td, b = timeit(lambda: random_walk_dense(f, maps, 5, 8, 8), repeat=1)
        na = a / a.sum(0, keepdim=True).clamp_min(1e-12)
        nb = b / b.sum(0, keepdim=True).clamp_min(1e-12)
        n = hw[0] * hw[1]
        k = 1 + 2 * 34  # neighbours per pixel at radius 5 (self + full disk of PSA's offsets)
        out[f"{hw[0]}x{hw[1]}"] = {"n": n, "sparse_s": round(ts, 4), "dense_s": round(td, 3),
                                 "speedup": round(td / ts, 1),
                                 "max_abs_diff_normalised": float((na - nb).abs().max()),
                                 "dense_matrix_floats": n * n, "sparse_floats": n * k * 2}
    big = out["64x48"]
    return {"grids": out, "targets": [
        target("random walk sparse vs dense (64x48 grid, logt=8)", big["speedup"], 20, "x"),
        target("random walk max |diff| after normalisation", big["max_abs_diff_normalised"], 1e-5, "", lower=True)],
        "summary": f"{big['speedup']}x at 64x48, max diff {big['max_abs_diff_normalised']:.2e}"}


def _loop_radius_mask(h: int, w: int, radius: int) -> np.ndarray:
    """The official-code way: two Python loops over all pixel pairs."""
    n = h * w
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        yi, xi = divmod(i, w)
        for j in range(n):
            yj, xj = divmod(j, w)
            if abs(yi - yj) <= radius and abs(xi - xj) <= radius:  # Chebyshev window
                m[i, j] = 1
    return m


def radius_mask(dataset: str) -> dict:
    """AFA/MCC local-window radius mask: vectorised library function vs Python double loop."""
    from pipeline.methods.common.token_affinity import radius_mask as rm
    h = w = 32   # AFA: 512 crop at stride 16, radius 8
    tl, ref = timeit(lambda: _loop_radius_mask(h, w, 8), repeat=1)
    tv, got = timeit(lambda: rm(h, w, 8).numpy(), repeat=5)
    equal = bool(np.array_equal(got.reshape(ref.shape).astype(bool), ref.astype(bool)))
    ratio = tl / tv
    return {"grid": [h, w], "radius": 8, "loop_s": round(tl, 4), "vectorised_s": round(tv, 6),
            "equal": equal, "targets": [target("radius mask vectorised vs loop", ratio, 20, "x")],
            "summary": f"{ratio:.0f}x, equal={equal}"}


def _par_loop(img: np.ndarray, masks: np.ndarray, dilations, num_iter=10, w1=0.3, w2=0.3,
              w3=0.01, eps=1e-8) -> np.ndarray:
    """PAR (AFA Eq. 8-10) written as plain per-pixel loops: img (3, H, W), masks (K, H, W)."""
    import math
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in
            ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))]
    _, H, W = img.shape
    clip = lambda v, n: min(max(v, 0), n - 1)  # noqa: E731  (replicate padding)
    dist = np.array([math.hypot(a, b) for a, b in offs])
    kpos = -((dist / (dist.std(ddof=1) + eps) / w2) ** 2)
    kpos = np.exp(kpos - kpos.max()) / np.exp(kpos - kpos.max()).sum()
    kern = np.zeros((H, W, len(offs)))
    for y in range(H):
        for x in range(W):
            nb = np.array([img[:, clip(y + a, H), clip(x + b, W)] for a, b in offs])  # (N, 3)
            std = nb.std(axis=0, ddof=1)
            krgb = -(((np.abs(nb - img[:, y, x]) / (std + eps) / w1) ** 2).mean(1))
            e = np.exp(krgb - krgb.max())
            kern[y, x] = e / e.sum() + w3 * kpos
    m = masks.copy()
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for y in range(H):
            for x in range(W):
                for j, (a, b) in enumerate(offs):
                    new[:, y, x] += kern[y, x, j] * m[:, clip(y + a, H), clip(x + b, W)]
        m = new
    return m


def par(dataset: str) -> dict:
    """AFA PAR: the library module vs the same equations as per-pixel Python loops."""
    from pipeline.methods.common.par import PAR
    torch.manual_seed(0)
    img = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    masks = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    dil = (1, 2, 4, 8)
    mod = PAR(dilations=dil).double()
    tv, a = timeit(lambda: mod(img, masks), repeat=3)
    tl, b = timeit(lambda: _par_loop(img[0].numpy(), masks[0].numpy(), dil), repeat=1)
    diff = float(np.abs(a[0].numpy() - b).max())
    return {"size": [24, 24], "dilations": list(dil), "module_s": round(tv, 4),
            "loop_s": round(tl, 3), "max_abs_diff": diff,
            "targets": [target("PAR vectorised vs per-pixel loop", tl / tv, 20, "x"),
                        target("PAR max |diff| vs loop", diff, 1e-6, "", lower=True)],
            "summary": f"{tl / tv:.0f}x, max diff {diff:.1e}"}


def _loop_tp_fp_fn(preds, gts, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image, per class TP/FP/FN counting with boolean masks (the loop found in many WSSS
    evaluation scripts), 255 ignored."""
    tp, fp, fn = (np.zeros(c, np.int64) for _ in range(3))
    for p, g in zip(preds, gts):
        valid = g < c
        for k in range(c):
            pk = (p == k) & valid
            gk = g == k
            tp[k] += np.count_nonzero(pk & gk)
            fp[k] += np.count_nonzero(pk & ~gk)
            fn[k] += np.count_nonzero(~pk & gk)
    return tp, fp, fn


def miou(dataset: str) -> dict:
    """mIoU: one bincount over all pixels vs a per-image, per-class TP/FP/FN Python loop."""
    from pipeline.data.voc import load_mask
    from pipeline.engine.metrics import confusion_matrix, scores_from_confusion
    root, ids, label_dir = dataset_ids(dataset, "val")
    gts = [load_mask(root, i, label_dir) for i in ids]
    rng = np.random.default_rng(0)
    preds = [np.where(rng.random(g.shape) < 0.2, rng.integers(0, 21, g.shape), np.minimum(g, 20)).astype(np.uint8)
             for g in gts]

    def fast():
        return confusion_matrix(np.concatenate([p.ravel() for p in preds]),
                                np.concatenate([g.ravel() for g in gts]), 21)
    tf, a = timeit(fast, repeat=3)
    tl, (tp, fp, fn) = timeit(lambda: _loop_tp_fp_fn(preds, gts, 21), repeat=1)
    d = np.diag(a)
    same = (np.array_equal(d, tp) and np.array_equal(a.sum(0) - d, fp)
            and np.array_equal(a.sum(1) - d, fn))
    with np.errstate(invalid="ignore"):
        loop_miou = float(np.nanmean(np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)))
    same = bool(same and loop_miou == scores_from_confusion(a)["miou"])
    return {"images": len(ids), "pixels": int(sum(g.size for g in gts)), "bincount_s": round(tf, 4),
            "loop_s": round(tl, 3), "identical": bool(same),
            "targets": [target("mIoU bincount vs per-image loop", tl / tf, 10, "x")],
            "summary": f"{tl / tf:.0f}x over {len(ids)} images, identical={same}"}


def storage(dataset: str) -> dict:
    """seeds.h5 (float16, chunked, gzip) vs per-image .npy dicts of float32 maps; random access."""
    from pipeline.io.storage import MapReader
    h5 = _find_seeds(dataset)
    with MapReader(h5) as r, tempfile.TemporaryDirectory() as td:
        ids = r.ids
        npy_bytes = 0
        for iid in ids:
            d = {k: r.read(iid, k)[0].astype(np.float32) for k in r.keys(iid)
                 if k not in ("class_ids", "image_size")}
            pth = Path(td) / f"{iid}.npy"
            np.save(pth, d, allow_pickle=True)
            npy_bytes += pth.stat().st_size
        rng = np.random.default_rng(0)
        order = rng.choice(len(ids), size=min(200, 4 * len(ids)))
        key = r.keys(ids[0])[0]
        t0 = time.perf_counter()
        for i in order:
            r.read(ids[int(i)], key)
        ms = (time.perf_counter() - t0) / len(order) * 1000
        t0 = time.perf_counter()
        for i in order[:50]:
            np.load(Path(td) / f"{ids[int(i)]}.npy", allow_pickle=True).item()
        npy_ms = (time.perf_counter() - t0) / 50 * 1000
    h5_bytes = Path(h5).stat().st_size
    frac = h5_bytes / npy_bytes
    return {"file": str(h5), "images": len(ids), "h5_bytes": h5_bytes, "npy_bytes": npy_bytes,
            "h5_random_read_ms": round(ms, 3), "npy_read_ms": round(npy_ms, 3),
            "targets": [target("seeds.h5 bytes / .npy float32 bytes", frac, 0.5, "", lower=True),
                        target("seeds.h5 random access of one image (ms)", ms, 5, " ms", lower=True)],
            "summary": f"{frac:.0%} of npy bytes, {ms:.2f} ms per random read"}


def _find_seeds(dataset: str) -> Path:
    for ds in (dataset, "demo"):
        for m in ("acr", "cam"):
            p = Path(f"results/{ds}/{m}/seeds.h5")
            if p.is_file():
                return p
    raise FileNotFoundError("no results/<dataset>/<method>/seeds.h5: run `make demo` first")
