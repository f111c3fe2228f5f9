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


def test_failed_write_leaves_no_artifact(tmp_path):
    p = tmp_path / "seeds.h5"
    with pytest.raises(ValueError):
        with MapWriter(p, ["bg"]) as w:
            w.write("a", [1], (2, 2), cams=np.ones((1, 2, 2)))
            w.write("b", [1], (2, 2), cams=np.full((1, 2, 2), np.nan))
    assert not p.exists() and not (tmp_path / "seeds.h5.tmp").exists()
    with pytest.raises(StorageError, match="does not exist"):
        MapReader(p)
