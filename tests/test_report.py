"""The Snakemake HTML report (issue: `snakemake --report report.html` shows every chain's
scores, per-class IoU, training curves and galleries in one self-contained page).

Unit tests of pipeline/steps/report.py's pure functions (fast, against brute-force references and
hand-known VOC colours), then one slow test: the report of tiny demo chains (tests/conftest.py
``tiny_dag``) rendered in headless Chromium.
"""
import base64
import html as htmlmod
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.steps import report
from pipeline.io.config import ConfigError, validate
from pipeline.data.voc import VOC_CLASSES
from tests.conftest import REPO, copy_demo_chains


# ----------------------------------------------------------------------- pure functions


def test_overlay_puts_voc_colours_on_label_pixels_and_keeps_background():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    lab = rng.choice([0, 1, 15, 255], size=(6, 7)).astype(np.uint8)
    full = report.overlay(img, lab, alpha=1.0)
    # hand-known VOC colours: aeroplane, person, void
    known = {1: (128, 0, 0), 15: (192, 128, 128), 255: (224, 224, 192)}
    for y in range(6):
        for x in range(7):
            want = img[y, x] if lab[y, x] == 0 else known[int(lab[y, x])]
            assert tuple(full[y, x]) == tuple(want), (y, x, lab[y, x])
    half = report.overlay(img, lab, alpha=0.25)
    for y in range(6):
        for x in range(7):
            if lab[y, x] == 0:
                assert tuple(half[y, x]) == tuple(img[y, x])
            else:
                ref = [round(0.75 * int(a) + 0.25 * b) for a, b in zip(img[y, x], known[int(lab[y, x])])]
                assert np.abs(half[y, x].astype(int) - ref).max() <= 1
    with pytest.raises(ValueError, match="must match"):
        report.overlay(img, lab[:, :5])
    with pytest.raises(ValueError, match="alpha"):
        report.overlay(img, lab, alpha=1.5)


def test_legend_lists_exactly_the_classes_drawn():
    rng = np.random.default_rng(1)
    labels = [rng.choice([0, 3, 7, 255], size=(5, 5)), rng.choice([0, 7, 20], size=(4, 6))]
    present = set()
    for lab in labels:
        for v in lab.ravel():
            if v not in (0, 255):
                present.add(int(v))
    got = report.legend_entries(labels, VOC_CLASSES)
    assert [c for c, _, _ in got] == sorted(present)
    assert [n for _, n, _ in got] == [VOC_CLASSES[c] for c in sorted(present)]
    assert dict((c, col) for c, _, col in got)[20] == (0, 64, 128)      # tvmonitor
    assert report.legend_entries([np.zeros((3, 3)), np.full((2, 2), 255)], VOC_CLASSES) == []
    with pytest.raises(ValueError, match="no class name"):
        report.legend_entries([np.full((2, 2), 5)], ["bg", "a"])


def test_gallery_ids_are_the_first_sorted_ids_whatever_the_order():
    ids = [f"2008_{i:06d}" for i in range(30)]
    rng = np.random.default_rng(2)
    picks = {tuple(report.gallery_ids(list(rng.permutation(ids)), 4)) for _ in range(5)}
    assert picks == {tuple(ids[:4])}
    assert report.gallery_ids(ids[:3], 10) == ids[:3]
    assert report.gallery_ids(ids + ids[:2], 3) == ids[:3]          # duplicates once
    with pytest.raises(ValueError, match="gallery_images"):
        report.gallery_ids(ids, 0)


def test_strongest_cam_and_argmax_label_match_brute_force():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 4, 5)).astype(np.float32)
    maps[1] += 0.5
    cids = np.array([4, 9, 12])
    cam, cid = report.strongest_cam(maps, cids)
    means = [maps[k].sum() / maps[k].size for k in range(3)]
    assert cid == cids[means.index(max(means))] == 9 and np.array_equal(cam, maps[1])
    lab = report.label_from_maps(maps, cids)
    for y in range(4):
        for x in range(5):
            col = [maps[k, y, x] for k in range(3)]
            assert lab[y, x] == cids[col.index(max(col))]
    assert report.strongest_cam(np.zeros((0, 2, 2)), np.zeros(0))[1] == 0
    assert not report.label_from_maps(np.zeros((0, 2, 3)), np.zeros(0)).any()


def test_class_names_come_from_the_manifest_when_it_has_them():
    assert report.class_names({}) == list(VOC_CLASSES)
    assert report.class_names({"classes": ["background", "cat"]}) == ["background", "cat"]


def test_iou_table_has_every_class_every_stage_and_the_values():
    names = ["background", "cat", "dog"]
    stages = {"seeds": {"iou": {"background": 0.5, "cat": 0.25}, "miou": 0.375},
              "segmentation": {"iou": {"background": 0.9, "cat": 0.1, "dog": 0.123}, "miou": 0.374}}
    t = report.iou_table_html(stages, names, "demo / cam")
    rows = re.findall(r"<tr>(.*?)</tr>|<tr class='m'>(.*?)</tr>", t)
    cells = [re.findall(r">([^<>]*)</t[dh]>", a or b) for a, b in rows]
    assert cells[0] == ["id", "class", "seeds", "segmentation"]
    assert cells[1] == ["0", "background", "50.0", "90.0"]
    assert cells[3] == ["2", "dog", "–", "12.3"]                       # not reported by seeds
    assert cells[4] == ["", "mIoU", "37.5", "37.4"]
    c = report.comparison_html({"dataset": "demo", "all_background": 3.2, "rows": [
        {"method": "acr", "seeds": 41.5, "refined": None, "pseudo": 50.0, "segmentation": 12.0,
         "own_segmentation": None, "chain_minutes": 7.6}]})
    assert "<th class='l'>acr</th><td>41.5</td><td>–</td><td>50.0</td>" in c and "3.2 mIoU" in c


def test_figures_are_valid_pngs_and_writes_are_atomic(tmp_path):
    curves = {"train_cls": [{"iter": i, "loss": 1.0 / i, "cls": 0.5 / i, "lr": 0.1} for i in (1, 2, 3)],
              "train_seg": []}
    p = report.plot_curves(curves, tmp_path / "c.png", "t")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 400 and np.asarray(im.convert("L")).std() > 5
    img = np.full((8, 8, 3), 128, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    lab[2:5, 2:5] = 8
    g = report.draw_gallery([("a", [("image", img), ("gt", report.overlay(img, lab))])],
                            report.legend_entries([lab], VOC_CLASSES), tmp_path / "g.png")
    with Image.open(g) as im:
        assert im.format == "PNG"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.png", "g.png"]   # no *.tmp left

    def boom(t):
        t.write_text("half")
        raise OSError("disk full")
    (tmp_path / "old.html").write_text("old")
    with pytest.raises(OSError):
        report.atomic_write(tmp_path / "old.html", boom)
    assert (tmp_path / "old.html").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.png", "g.png", "old.html"]


def test_report_config_is_validated():
    base = {"seed": 0, "report": {"gallery_images": 3}}
    validate(base)
    with pytest.raises(ConfigError, match="report.galery_images"):
        validate({"report": {"galery_images": 3}})
    with pytest.raises(ConfigError, match="positive integer"):
        validate({"report": {"gallery_images": 0}})


def test_cli_names_the_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stages.report_figures", "--manifest",
                        str(tmp_path / "dataset.json"), "--chain", str(tmp_path), "--out-dir",
                        str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    assert "ERROR [report_figures]" in r.stderr and "dataset.json is missing" in r.stderr
    assert not (tmp_path / "report").exists()


def make_chain(tmp: Path, ids_train: list[str], ids_val: list[str], classes=None) -> tuple[Path, Path]:
    """A hand-made 12x10 px chain: dataset, manifest, seeds.h5 / refined.h5, PNGs, metrics."""
    from pipeline.data.voc import save_mask_png
    from pipeline.io.storage import MapWriter
    from pipeline.io.storage import write_json
    root = tmp / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    chain = tmp / "results/d/m"
    for sub in ("pseudo", "predictions", "cls", "affinity", "seg"):
        (chain / sub).mkdir(parents=True)
    rng = np.random.default_rng(5)
    names = classes or list(VOC_CLASSES)
    with MapWriter(chain / "seeds.h5", names) as sw, MapWriter(chain / "refined.h5", names) as rw:
        for k, i in enumerate(ids_train + ids_val):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
            gt = np.zeros((12, 10), np.uint8)
            gt[2:7, 3:8] = 1 + k % 3
            save_mask_png(root / "SegmentationClass" / f"{i}.png", gt)
            save_mask_png(chain / ("pseudo" if i in ids_train else "predictions") / f"{i}.png", gt)
            if i in ids_train:
                sw.write(i, [1 + k % 3], (12, 10), cams=rng.random((1, 12, 10)))
                rw.write(i, [0, 1 + k % 3], (12, 10), probs=rng.random((2, 12, 10)))
    man = {"root": str(root), "label_dir": "SegmentationClass",
           "splits": {"train": ids_train, "eval_train": ids_train, "val": ids_val}}
    if classes:
        man["classes"] = classes
    write_json(tmp / "dataset.json", man)
    iou = {"iou": {n: 0.5 for n in names}, "miou": 0.5}
    for f in ("seeds_miou.json", "pseudo_miou.json", "miou.json"):
        write_json(chain / f, iou)
    write_json(chain / "refined_miou.json", {**iou, "key": "probs"})
    write_json(chain / "cls/metrics.json", {"curve": [{"iter": 1, "loss": 1.0}, {"iter": 2, "loss": 0.5}]})
    write_json(chain / "affinity/metrics.json", {"loss_curve": [{"iter": 1, "loss": 1.0}]})
    write_json(chain / "seg/metrics.json", {"loss_curve": []})
    return tmp / "dataset.json", chain


def test_chain_report_draws_every_figure_from_a_hand_made_chain(tmp_path):
    names = ["background", "zebra", "yak", "xylophone"]        # the manifest's own classes
    man, chain = make_chain(tmp_path, ["t3", "t1", "t2"], ["v2", "v1"], classes=names)
    out = report.chain_report(man, chain, tmp_path / "out", n_images=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["curves.png", "gallery_train.png", "gallery_val.png", "iou.html"]
    table = out["iou"].read_text()
    assert all(f">{n}<" in table for n in names) and "aeroplane" not in table
    sizes = {}
    for k in ("gallery_train", "gallery_val"):
        with Image.open(out[k]) as im:
            sizes[k] = im.size
    assert sizes["gallery_train"][0] > sizes["gallery_val"][0]        # 5 panels vs 3
    # a missing pseudo label of a gallery image: one clear error naming it
    (chain / "pseudo" / "t1.png").unlink()
    with pytest.raises(report.ReportError, match=r"pseudo/t1\.png is missing"):
        report.chain_report(man, chain, tmp_path / "out2", n_images=2)
    (chain / "pseudo" / "t3.png").unlink()            # not among the first 2 sorted: not read
    save = chain / "pseudo" / "t1.png"
    from pipeline.data.voc import save_mask_png
    save_mask_png(save, np.zeros((12, 10), np.uint8))
    report.chain_report(man, chain, tmp_path / "out3", n_images=2)


# ----------------------------------------------------------------------- the HTML report


CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"
# Run after the report's React app has drawn: open a chain's category in the menu (as a click
# on it does) and show one of its embedded images (as a click on the result does; `app` and
# `results` are globals of Snakemake 9's report page), then write into the title whether the
# browser decoded the image.
SHOW_RESULT = """<script>
setTimeout(function () {
  var path = Object.keys(results).find(function (p) { return p.endsWith(%(suffix)s); });
  app.showCategory(%(category)s);
  app.setView({content: "img", contentPath: results[path].data_uri, resultPath: path});
  setTimeout(function () {
    var img = document.querySelector('img[src^="data:image/png"]');
    document.title = (img && img.complete && img.naturalWidth > 0)
      ? "IMG_OK " + img.naturalWidth + "x" + img.naturalHeight : "IMG_BAD";
  }, 500);
}, 500);
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        msg = f"headless Chromium is needed to render the report: {CHROMIUM_INSTALL}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (.ci/run installs it)")
        pytest.skip(msg)
    return exe


def browse(exe: str, page: Path, out: Path, *, dom: bool = False) -> str | None:
    """Screenshot ``page`` into ``out`` (or return its DOM after scripts ran)."""
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--virtual-time-budget=8000", "--window-size=1400,1000",
           f"--user-data-dir={out.parent / ('chromium-' + out.stem)}"]
    cmd += ["--dump-dom"] if dom else [f"--screenshot={out}"]
    r = subprocess.run(cmd + [page.as_uri()], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout if dom else None


def embedded(report_html: str) -> dict[str, dict]:
    """The report's results: ``{path: {"name", "mime_type", "data_uri", ...}}``."""
    m = re.search(r'<script id="results">\s*var results = (\{.*?\});?\s*</script>', report_html, re.S)
    assert m, "no results block in the report"
    return json.loads(m.group(1))


def decode(uri: str) -> bytes:
    head, data = uri.split(",", 1)
    assert head.endswith(";base64"), head[:80]
    return base64.b64decode(data)


def check_report(workdir: Path, chains: list[str], names: list[str], tmp: Path) -> None:
    """Everything the issue asks of report.html in ``workdir`` (see the test below)."""
    page = workdir / "report.html"
    text = page.read_text(encoding="utf-8")
    # self-contained: no resource fetched over the network
    assert not re.findall(r'(?:src|href)\s*=\s*["\']https?://', text), "external resource in report"
    res = embedded(text)
    for chain in chains:
        base = f"results/{chain}/report/"
        for f in ("curves.png", "gallery_train.png", "gallery_val.png"):
            png = decode(res[base + f]["data_uri"])
            with Image.open(io.BytesIO(png)) as im:
                im.load()
                a = np.asarray(im.convert("RGB"))
            assert im.format == "PNG" and min(a.shape[:2]) > 200 and a.std() > 10, (chain, f)
        table = decode(res[base + "iou.html"]["data_uri"]).decode()
        assert all(f">{htmlmod.escape(n)}<" in table for n in names), chain
    # the per-chain categories and the comparison, with every chain as a row
    comp = [p for p in res if p.endswith("report/comparison.html")]
    assert comp, "comparison table not in the report"
    ctable = decode(res[comp[0]]["data_uri"]).decode()
    assert all(f">{c.split('/')[1]}<" in ctable for c in chains)

    exe = chromium()
    # 1. the landing page renders (not blank) with the workflow description
    shot = tmp / "landing.png"
    browse(exe, page, shot)
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
    assert a.shape == (1000, 1400) and a.std() > 20, "blank landing page"
    dom = browse(exe, page, tmp / "landing_dom.html", dom=True)
    assert "WSSS pipeline report" in dom and "Results" in dom
    # 2. a chain's category opened and its train gallery shown: decoded by the browser
    dataset, method = chains[0].split("/")
    view = tmp / "view.html"
    head, tail = text.rsplit("</body>", 1)      # the page's own end (scripts contain the string too)
    view.write_text(head + SHOW_RESULT % {
        "suffix": json.dumps(f"{chains[0]}/report/gallery_train.png"),
        "category": json.dumps(f"{dataset} / {method}")} + "</body>" + tail, encoding="utf-8")
    dom = browse(exe, view, tmp / "view_dom.html", dom=True)
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert title.startswith("IMG_OK"), title
    # rendered menu entries (the data block holds them only as quoted JSON strings)
    for entry in ("comparison", f"{dataset} / {method}", "training curves", "galleries"):
        assert f">{entry}<" in dom, entry
    shot = tmp / "gallery.png"
    browse(exe, view, shot)
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"))
    assert a.std() > 20 and len(np.unique(a.reshape(-1, 3), axis=0)) > 500, "gallery not drawn"


@pytest.mark.slow
def test_report_is_one_self_contained_page_that_renders_in_chromium(tiny_dag, tmp_path):
    """The demo chains of the shared tiny build, copied (mtimes kept, so nothing reruns):
    `snakemake results/demo/report/comparison.html` draws every chain's figures and the
    comparison; `snakemake --report` embeds them in one HTML page, checked by decoding its
    images and by rendering it in headless Chromium."""
    from pipeline.io.config import load_params
    methods = sorted(load_params(tiny_dag / "params.yaml")["methods"])
    d = copy_demo_chains(tiny_dag, tmp_path / "w", methods)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    sm = [sys.executable, "-m", "snakemake", "--cores", "2"]
    target = "results/demo/report/comparison.html"
    r = subprocess.run(sm + [target], cwd=d, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ran = set(re.findall(r"^(?:local)?rule (\w+):", r.stdout + r.stderr, re.M))
    assert ran == {"compare", "report_figures", "report_comparison"}, ran   # no chain rebuilt
    r = subprocess.run(sm + ["--report", "report.html", target], cwd=d, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = list(VOC_CLASSES)
    check_report(d, [f"demo/{m}" for m in methods], names, tmp_path)


def test_report_shows_the_protocol_numbers(tmp_path):
    """Per-class table: seeds / refined at the best threshold on GT (labelled official, not
    fair) and the three segmentation protocols as columns; comparison page: the protocol table."""
    from pipeline.io.storage import write_json
    names = ["background", "zebra", "yak", "xylophone"]
    man, chain = make_chain(tmp_path, ["t1", "t2"], ["v1"], classes=names)
    best = {"miou": 0.625, "bg_threshold": 0.27, "protocol": "official (...)",
            "iou": {"background": 0.75, "zebra": 0.5, "yak": None}}
    write_json(chain / "seeds_miou.json", {"iou": {n: 0.5 for n in names}, "miou": 0.5,
                                           "best_threshold_on_gt": best})
    seg = {"iou": {n: 0.5 for n in names}, "miou": 0.5, "configured_as": "multi_scale_flip",
           "protocols": {"single_scale": {"miou": 0.401, "iou": {"background": 0.802, "zebra": 0.0}},
                         "multi_scale_flip": {"miou": 0.5, "iou": {n: 0.5 for n in names}},
                         "multi_scale_flip_crf": {"miou": 0.478, "iou": {"background": 0.956, "zebra": 0.0}}}}
    write_json(chain / "miou.json", seg)
    write_json(chain / "pseudo_miou.json", {"iou": {n: 0.5 for n in names}, "miou": 0.5,
                                            "best_threshold_on_gt": {"miou": None, "bg_threshold": None}})
    table = report.chain_report(man, chain, tmp_path / "out", n_images=1)["iou"].read_text()
    rows = re.findall(r"<tr>(.*?)</tr>|<tr class='m'>(.*?)</tr>", table)
    cells = [re.findall(r">([^<>]*)</t[dh]>", a or b) for a, b in rows]
    assert cells[0][2:] == ["seeds (CAM)", "seeds (CAM), best τ on GT (0.27; official, not fair)",
                            "refined (PSA RW)", "pseudo labels (CRF)", "DeepLabV2 val",
                            "DeepLabV2 val, single scale", "DeepLabV2 val, MS + flip",
                            "DeepLabV2 val, MS + flip + CRF"]
    assert cells[1][2:] == ["50.0", "75.0", "50.0", "50.0", "50.0", "80.2", "50.0", "95.6"]
    assert cells[-1][2:] == ["50.0", "62.5", "50.0", "50.0", "50.0", "40.1", "50.0", "47.8"]
    c = report.comparison_html({"dataset": "d", "rows": [
        {"method": "acr", "seeds": 41.5, "refined": None, "pseudo": 50.0, "segmentation": 45.2,
         "own_segmentation": None, "chain_minutes": 7.6, "seeds_best_on_gt": 48.0,
         "seeds_best_threshold": 0.3, "seg_single_scale": 40.1, "seg_multi_scale_flip": 45.2,
         "seg_multi_scale_flip_crf": 47.8}]})
    assert ("<th class='l'>acr</th><td>41.5</td><td>48.0 (τ 0.30)</td><td>–</td><td>–</td>"
            "<td>50.0</td><td>40.1</td><td>45.2</td><td>47.8</td>") in c
    assert "not a fair number" in c and "<th>DeepLabV2 MS + flip + CRF</th>" in c
