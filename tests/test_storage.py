import numpy as np
import pytest

from pipeline.storage import MapReader, MapWriter, StorageError


def test_hdf5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "seeds.h5"
    data = {}
    with MapWriter(p, ["bg", "a", "b", "c"], {"method": "acr", "params": {"x": 1}}) as w:
        for i, k in enumerate([1, 2, 0]):
            maps = rng.random((k, 5 + i, 7)).astype(np.float32)
            cids = rng.choice([1, 2, 3], size=k, replace=False)
            w.write(f"img{i}", cids, (5 + i, 7), cams=maps, cams_star=maps / 2)
            data[f"img{i}"] = (maps, cids)
    assert not (tmp_path / "seeds.h5.tmp").exists()
    with MapReader(p) as r:
        assert sorted(r.ids) == ["img0", "img1", "img2"]
        assert r.class_names == ["bg", "a", "b", "c"] and r.attrs["method"] == "acr"
        for iid, (maps, cids) in data.items():
            got, gc, size = r.read(iid, "cams")
            assert got.dtype == np.float32 and got.shape == maps.shape
            assert np.allclose(got, maps, atol=1e-3)          # float16 storage
            assert (gc == cids).all() and size == maps.shape[1:]
            assert np.allclose(r.read(iid, "cams_star")[0], maps / 2, atol=1e-3)
        with pytest.raises(StorageError, match="no image"):
            r.read("nope")
        with pytest.raises(StorageError, match="no map"):
            r.read("img0", "probs")
    import h5py
    with h5py.File(p, "r") as f:     # float16, one chunk per class map, shuffle + gzip
        d = f["img0/cams"]
        assert d.dtype == np.float16 and d.chunks == (1, 5, 7)
        assert d.compression == "gzip" and d.compression_opts == 4 and d.shuffle


def test_failed_write_leaves_no_artifact(tmp_path):
    p = tmp_path / "seeds.h5"
    with pytest.raises(ValueError):
        with MapWriter(p, ["bg"]) as w:
            w.write("a", [1], (2, 2), cams=np.ones((1, 2, 2)))
            w.write("b", [1], (2, 2), cams=np.full((1, 2, 2), np.nan))
    assert not p.exists() and not (tmp_path / "seeds.h5.tmp").exists()
    with pytest.raises(StorageError, match="does not exist"):
        MapReader(p)


def test_artifact_records_its_inputs_and_consumers_refuse_others(tmp_path):
    import json as _json

    from pipeline.storage import MapReader, MapWriter, StorageError, ids_digest
    p = tmp_path / "seeds.h5"
    params = {"data": {"root": str(tmp_path / "VOC2012")}, "scales": [1.0]}
    with MapWriter(p, ["background", "a"], {"params": params}) as w:
        for iid in ("b", "a"):
            w.write(iid, np.array([1]), (2, 2), cams=np.ones((1, 2, 2)))
    with MapReader(p) as r:
        assert r.attrs["num_images"] == 2 and r.attrs["image_ids_sha256"] == ids_digest(["a", "b"])
        assert r.attrs["code_version"].startswith("wsss-pipeline ")
        assert _json.loads(r.attrs["params"]) == params
        r.require(["a"], tmp_path / "VOC2012")
        with pytest.raises(StorageError, match=r"another image list: 1 of the 2 images"):
            r.require(["a", "c"])
        with pytest.raises(StorageError, match="made from the dataset at"):
            r.require(["a"], tmp_path / "other")
