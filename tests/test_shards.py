"""Sharded per-image stages: N shard jobs + merge == one unsharded run."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.io.shards import merge_map_files, merge_png_dirs, parse_shard, shard_ids
from pipeline.io.storage import MapWriter, StorageError
from tests.conftest import copy_demo_cam, snakemake


def h5_content(path: Path) -> tuple[dict, list]:
    """File attributes and, per group in order, every dataset's dtype/shape/chunks/filter/bytes."""
    with h5py.File(path, "r") as f:
        attrs = {k: str(v) for k, v in f.attrs.items()}
        groups = []
        for gid in f.keys():
            ds = []
            for k in sorted(f[gid].keys()):
                d = f[gid][k]
                ds.append((k, str(d.dtype), d.shape, d.chunks, d.compression, d.shuffle,
                           d[()].tobytes()))
            groups.append((gid, ds))
    return attrs, groups


def write_maps(path: Path, ids, seed=0):
    rng = np.random.default_rng(seed)
    with MapWriter(path, ["background", "a", "b"], {"method": "x", "num_images": len(ids),
                                                   "params": {"k": 1}}) as w:
        for i, iid in enumerate(ids):
            k = i % 3
            w.write(iid, np.arange(1, k + 1), (7, 9), cams=rng.random((k, 7, 9)))


def test_shard_ids_partition_the_list():
    ids = [f"i{k}" for k in range(11)]
    parts = [shard_ids(ids, i, 4) for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "a/2", "1", "-1/3"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_merged_maps_equal_unsharded(tmp_path):
    ids = [f"img{k:02d}" for k in range(9)]
    write_maps(tmp_path / "full.h5", ids)
    # the shards hold the same per-image content (written from the same generator order)
    full = h5py.File(tmp_path / "full.h5", "r")
    parts = []
    for s in range(3):
        sub = shard_ids(ids, s, 3)
        p = tmp_path / f"part{s}.h5"
        with MapWriter(p, ["background", "a", "b"], {"method": "x", "num_images": len(sub),
                                                    "params": {"k": 1}}) as w:
            for iid in sub:
                g = full[iid]
                w.write(iid, g["class_ids"][()], tuple(g["image_size"][()]),
                        cams=g["cams"][()].astype(np.float32))
        parts.append(p)
    full.close()
    merge_map_files(parts[::-1], tmp_path / "merged.h5", ids)
    assert h5_content(tmp_path / "merged.h5") == h5_content(tmp_path / "full.h5")


def test_merge_refuses_missing_or_duplicate_images(tmp_path):
    ids = ["a", "b", "c"]
    write_maps(tmp_path / "p0.h5", ["a", "b"])
    write_maps(tmp_path / "p1.h5", ["b", "c"])
    with pytest.raises(StorageError, match="two shards"):
        merge_map_files([tmp_path / "p0.h5", tmp_path / "p1.h5"], tmp_path / "m.h5", ids)
    with pytest.raises(StorageError, match="in no shard"):
        merge_map_files([tmp_path / "p0.h5"], tmp_path / "m.h5", ids)
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.h5.tmp").exists()
    (tmp_path / "d0").mkdir()
    (tmp_path / "d0" / "a.png").write_bytes(b"x")
    with pytest.raises(StorageError, match="in no shard"):
        merge_png_dirs([tmp_path / "d0"], tmp_path / "out", ids)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sharded_snakemake_run_equals_unsharded(tiny_dag, tmp_path):
    # the unsharded reference: the session's tiny demo/cam chain (tests/conftest.py)
    copy_demo_cam(tiny_dag, tmp_path)
    r = tmp_path / "results/demo/cam"
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("seeds.h5", "refined.h5", "pseudo"):
        (r / name).rename(ref / name)
    shards = ["--config", "run=" + json.dumps({"datasets": ["demo"], "methods": ["cam"], "shards": 3})]
    for target, name in (("seeds.h5", "seeds.h5"), ("refined.h5", "refined.h5"), ("pseudo_miou.json", "pseudo")):
        snakemake(tmp_path, f"results/demo/cam/{target}", "--allowed-rules",
                  *(["export_seeds", "export_seeds_shard"] if name == "seeds.h5" else
                    ["refine_seeds", "refine_seeds_shard"] if name == "refined.h5" else
                    ["make_pseudo_labels", "make_pseudo_labels_shard"]), *shards)
    assert len(list((tmp_path / "results/demo/logs/cam").glob("export_seeds.*.log"))) == 3
    assert h5_content(r / "seeds.h5") == h5_content(ref / "seeds.h5")
    assert h5_content(r / "refined.h5") == h5_content(ref / "refined.h5")
    pngs = sorted(p.name for p in (ref / "pseudo").glob("*.png"))
    assert pngs == sorted(p.name for p in (r / "pseudo").glob("*.png")) and len(pngs) == 24
    for n in pngs:
        assert (r / "pseudo" / n).read_bytes() == (ref / "pseudo" / n).read_bytes()
    assert not (r / "shards").exists() or not any((r / "shards").iterdir())  # temp() parts removed
