"""Sharded per-image stages: split an image list into N jobs and merge their outputs.

``export_seeds``, ``refine_seeds`` and ``make_pseudo_labels`` process images independently,
so a cluster can run them as N jobs (``run.shards`` in params.yaml; Snakemake rules
``*_shard``) and merge. The merged output holds exactly what the unsharded run writes: the
same HDF5 groups in the same order with the same datasets (values, dtype, chunking,
compression) and file attributes, or the same PNG files.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import h5py

from pipeline.io.storage import FORMAT, StorageError, atomic_directory, atomic_write, ids_digest


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``.

    Raises:
        ValueError: malformed spec (the message shows the expected form).
    """
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects I/N with integers, e.g. 0/4; got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def shard_ids(ids: Sequence[str], index: int, count: int) -> list[str]:
    """The ids of shard ``index`` of ``count``: every ``count``-th id starting at ``index``
    (balanced; the union over shards is ``ids``, disjoint)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside [0, {count})")
    return list(ids)[index::count]


def merge_map_files(parts: Sequence[str | Path], out_path: str | Path, ids: Sequence[str]) -> None:
    """Merge shard HDF5 files (:class:`pipeline.io.storage.MapWriter` format) into ``out_path``.

    Groups are copied (h5py ``copy``: data, dtype, chunks and filters unchanged) in the order
    of ``ids``; file attributes come from the first part, with ``num_images`` (if present) set
    to ``len(ids)``. Published with :func:`pipeline.io.storage.atomic_write` (``<out>.tmp``, then
    renamed), so a failure leaves no partial file.

    Raises:
        StorageError: a part is missing / of another format, an id is in no part or in two,
            or the parts disagree on their attributes.
    """
    out_path = Path(out_path)
    files = []
    try:
        for p in parts:
            if not Path(p).is_file():
                raise StorageError(f"shard {p} does not exist; rerun its *_shard job")
            f = h5py.File(p, "r")
            files.append(f)
            if f.attrs.get("format") != FORMAT:
                raise StorageError(f"shard {p} is not a {FORMAT} file")
        where: dict[str, h5py.File] = {}
        for f in files:
            for iid in f.keys():
                if iid in where:
                    raise StorageError(f"image {iid} is in two shards ({where[iid].filename}, {f.filename})")
                where[iid] = f
        missing = [i for i in ids if i not in where]
        if missing:
            raise StorageError(f"{len(missing)} image(s) in no shard, e.g. {missing[:3]}; rerun the shards")
        per_shard = ("num_images", "image_ids_sha256")
        attrs = {k: v for k, v in files[0].attrs.items() if k not in per_shard}
        for f in files[1:]:
            other = {k: v for k, v in f.attrs.items() if k not in per_shard}
            if set(other) != set(attrs) or any(str(other[k]) != str(attrs[k]) for k in attrs):
                raise StorageError(f"shard {f.filename} was made with other parameters than "
                                   f"{files[0].filename}; rerun all shards")

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as dst:
                for k, v in files[0].attrs.items():
                    dst.attrs[k] = (len(ids) if k == "num_images" else
                                    ids_digest(ids) if k == "image_ids_sha256" else v)
                for iid in ids:
                    where[iid].copy(where[iid][iid], dst, name=iid)
        atomic_write(out_path, write)
    finally:
        for f in files:
            f.close()


def merge_png_dirs(parts: Sequence[str | Path], out_dir: str | Path, ids: Sequence[str]) -> None:
    """Copy ``<id>.png`` of every id from the shard folders into ``out_dir`` (built in
    ``<out_dir>.tmp`` and renamed by :func:`pipeline.io.storage.atomic_directory`).

    Raises:
        StorageError: an id's PNG is in no shard folder or in two.
    """
    out_dir = Path(out_dir)
    where: dict[str, Path] = {}
    for d in map(Path, parts):
        for png in d.glob("*.png"):
            if png.stem in where:
                raise StorageError(f"{png.name} is in two shards ({where[png.stem].parent}, {d})")
            where[png.stem] = png
    missing = [i for i in ids if i not in where]
    if missing:
        raise StorageError(f"{len(missing)} pseudo label(s) in no shard, e.g. {missing[:3]}")
    with atomic_directory(out_dir) as tmp:
        for iid in ids:
            shutil.copy2(where[iid], tmp / f"{iid}.png")
