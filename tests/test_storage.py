import os

import numpy as np
import pytest

from pipeline.io.storage import MapReader, MapWriter, StorageError


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

    from pipeline.io.storage import MapReader, MapWriter, StorageError, ids_digest
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


# ------------------------------------------------------------------ atomic publishing, disk full
def _listing(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    from pipeline.io.storage import atomic_write, temp_path
    p = tmp_path / "sub" / "m.json"            # parent created
    seen = []

    def write(t):
        seen.append(t)
        assert not p.exists()                  # nothing under the final name while writing
        t.write_text("new")
    assert atomic_write(p, write) == p
    assert seen == [tmp_path / "sub" / "m.json.tmp"] == [temp_path(p)]
    assert p.read_text() == "new" and _listing(tmp_path) == ["sub", "sub/m.json"]
    ino = p.stat().st_ino
    atomic_write(p, lambda t: t.write_text("newer"))
    assert p.read_text() == "newer" and p.stat().st_ino != ino   # renamed over, not rewritten
    temp_path(p).write_text("stale from a killed run")
    atomic_write(p, lambda t: t.write_bytes(b"x"))
    assert p.read_bytes() == b"x" and _listing(tmp_path) == ["sub", "sub/m.json"]
    link = tmp_path / "sub" / "img.jpg"        # a writer that cannot overwrite: stale one removed
    temp_path(link).symlink_to("elsewhere")
    atomic_write(link, lambda t: t.symlink_to("m.json"))
    assert link.read_text() == "x" and _listing(tmp_path) == ["sub", "sub/img.jpg", "sub/m.json"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), ValueError("bad"),
                                 KeyboardInterrupt()])
def test_atomic_write_failure_keeps_old_file_and_removes_temporary(tmp_path, exc):
    from pipeline.io.storage import atomic_write
    p = tmp_path / "model.pt"
    p.write_text("old")

    def boom(t):
        t.write_text("half")
        raise exc
    with pytest.raises(type(exc)):
        atomic_write(p, boom)
    assert p.read_text() == "old" and _listing(tmp_path) == ["model.pt"]
    q = tmp_path / "absent.h5"                 # no old file: still none afterwards
    with pytest.raises(type(exc)):
        atomic_write(q, boom)
    assert _listing(tmp_path) == ["model.pt"]


def test_atomic_torch_save_and_write_json_go_through_atomic_write(tmp_path):
    import torch
    from pipeline.io.storage import atomic_torch_save, write_json
    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "m.pt")
    write_json(tmp_path / "x.json", {"b": np.int64(3), "a": [np.float32(0.5)]})
    assert torch.load(tmp_path / "m.pt")["a"].tolist() == [1.0, 1.0]
    assert (tmp_path / "x.json").read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 3\n}\n'
    (tmp_path / "x.json").write_text("old")
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"a": object()})
    assert (tmp_path / "x.json").read_text() == "old"
    with pytest.raises(Exception):
        atomic_torch_save(lambda: 0, tmp_path / "m.pt")   # a lambda cannot be pickled
    assert torch.load(tmp_path / "m.pt")["a"].tolist() == [1.0, 1.0]
    assert _listing(tmp_path) == ["m.pt", "x.json"]


def test_atomic_directory_publishes_the_whole_folder(tmp_path):
    from pipeline.io.storage import atomic_directory
    out = tmp_path / "pseudo"
    out.mkdir()
    (out / "old.png").write_text("old")
    (tmp_path / "pseudo.tmp").mkdir()
    (tmp_path / "pseudo.tmp" / "stale.png").write_text("killed run")
    with atomic_directory(out) as tmp:
        assert tmp == tmp_path / "pseudo.tmp" and list(tmp.iterdir()) == []   # stale one gone
        (tmp / "a.png").write_text("a")
        assert (out / "old.png").exists()      # old folder intact while writing
    assert _listing(tmp_path) == ["pseudo", "pseudo/a.png"]
    with atomic_directory(tmp_path / "new" / "d") as tmp:   # parents created
        (tmp / "b").write_text("b")
    assert (tmp_path / "new" / "d" / "b").read_text() == "b"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), RuntimeError("x"),
                                 KeyboardInterrupt()])
def test_atomic_directory_failure_keeps_old_folder_and_removes_temporary(tmp_path, exc):
    from pipeline.io.storage import atomic_directory
    out = tmp_path / "pred"
    out.mkdir()
    (out / "old.png").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_directory(out) as tmp:
            (tmp / "half.png").write_text("half")
            raise exc
    assert _listing(tmp_path) == ["pred", "pred/old.png"]
    with pytest.raises(type(exc)):
        with atomic_directory(tmp_path / "none") as tmp:
            (tmp / "half.png").write_text("half")
            raise exc
    assert _listing(tmp_path) == ["pred", "pred/old.png"]


def test_is_disk_full_recognises_enospc_edquot_efbig_and_hdf5_messages():
    import errno
    from pipeline.io.storage import is_disk_full
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        assert is_disk_full(OSError(code, os.strerror(code)))
        assert is_disk_full(OSError(code, "")) # by errno, whatever the text
    assert is_disk_full(RuntimeError("Can't write data (file write failed: ..., errno = 28, "
                                     "error message = 'No space left on device')"))
    assert is_disk_full(OSError("[Errno 122] Disk quota exceeded"))
    assert not is_disk_full(OSError("plain"))
    assert not is_disk_full(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad"))


def test_run_cli_reports_a_full_disk_in_one_line_and_other_oserrors_as_tracebacks():
    """run_cli uses is_disk_full: EDQUOT -> one line, exit 2 (os._exit: a subprocess);
    EACCES -> re-raised."""
    import subprocess
    import sys
    from pathlib import Path
    src = ("import errno\n"
           "from stages._common import run_cli\n"
           "def main():\n"
           "    raise OSError(errno.{}, 'x')\n"
           "run_cli('t', main)\n")
    root = Path(__file__).resolve().parents[1]
    for name, rc, text in (("EDQUOT", 2, "ERROR [t]: disk full"), ("EACCES", 1, "Traceback")):
        r = subprocess.run([sys.executable, "-c", src.format(name)], cwd=root, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == rc and text in r.stderr, r.stderr[-2000:]
