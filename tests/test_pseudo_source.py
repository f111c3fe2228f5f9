"""``make_pseudo_labels.source: seeds`` - ViT-PCM's official pseudo labels: the dense CRF on the
BPM distribution itself, without the affinity stages (deepplants/ViT-PCM ``main.py test
--crf``, ``crf.py``). The distribution read back from ``seeds.h5`` (``bpm_bg``, ``bpm_fg``) is
checked against the one it was made from, the labels against pydensecrf run by hand on it."""
import numpy as np
import pytest

from pipeline.io.storage import MapReader, MapWriter, StorageError
from tests.test_bad_inputs import make_voc

NAMES = ["background", "a", "b", "c"]
CODE_CRF = dict(gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                bilateral_compat=4, iters=10)


def _distribution(rng, k, H, W):
    """A label-merged BPM-like distribution (k+1, H, W), background first: spread over many
    decades, with an all-zero pixel (an all-zero merged patch) and a background-only one."""
    p = rng.random((k + 1, H, W)) ** 3
    p[:, 0, 0] = 0
    p[1:, 0, 1] = 0
    s = p.sum(0, keepdims=True)
    return np.where(s > 0, p / np.where(s > 0, s, 1), 0)


def _seeds_h5(path, rng, ids, shape, keys=("bpm_bg", "bpm_fg")):
    """A seeds.h5 as export_seeds writes it for ViT-PCM, and the distributions it holds."""
    dists = {}
    with MapWriter(path, NAMES, {"method": "vitpcm", "num_images": len(ids), "params": {}}) as w:
        for i, iid in enumerate(ids):
            cids = np.array([i % 3 + 1, 3]) if i % 3 < 2 else np.array([], np.int64)
            p = _distribution(rng, len(cids), *shape)
            k = len(cids)
            maps = {"cams": p[1:] / np.maximum(p[1:] + p[:1], 1e-12),
                    "bpm_bg": np.repeat(p[:1], k, 0), "bpm_fg": p[1:]}
            w.write(iid, cids, shape, **{n: maps[n] for n in ("cams",) + tuple(keys)})
            dists[iid] = (p if k else np.ones((1,) + shape), np.concatenate([[0], cids]).astype(np.int64))
    return dists


def test_read_distribution_is_the_stored_bpm(tmp_path):
    """source: seeds reads [p_0; p_k] back (float16 storage: relative 2^-11 above 6e-5);
    source: refined reads the map ``key`` unchanged; no foreground class: background."""
    from pipeline.steps.pseudo import read_distribution
    ids = ["a0", "a1", "a2"]
    dists = _seeds_h5(tmp_path / "s.h5", np.random.default_rng(0), ids, (5, 6))
    with MapReader(tmp_path / "s.h5") as r:
        for iid in ids:
            p, cids = read_distribution(r, iid, "seeds", "probs")
            q, qids = dists[iid]
            assert p.dtype == np.float32 and (cids == qids).all() and p.shape == q.shape
            assert np.allclose(p, q, rtol=2 ** -11, atol=6e-8)
        cams, cids = read_distribution(r, "a0", "refined", "cams")
        assert cams.shape == (2, 5, 6) and cids.tolist() == [1, 3]


@pytest.mark.parametrize("crf", [None, CODE_CRF])
def test_pseudo_labels_from_seeds_are_the_crf_of_the_bpm(tmp_path, crf):
    """Official ``main.py test --crf``: argmax of DenseCRF(unary_from_softmax(p)) of the BPM
    distribution p (crf.py: Gaussian 1 / 3, bilateral 67 / 3 / 4, 10 iterations); without a
    CRF the arg-max of p. The reference runs pydensecrf directly on the float64 distribution
    the file was made from."""
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as U
    from PIL import Image

    from pipeline.data.voc import load_image
    from pipeline.steps.pseudo import make_pseudo_labels
    _, ids = make_voc(tmp_path / "ds", n=4)
    dists = _seeds_h5(tmp_path / "seeds.h5", np.random.default_rng(1), ids, (20, 30))
    out = tmp_path / "pseudo"
    t = make_pseudo_labels(tmp_path / "seeds.h5", "probs", tmp_path / "ds", ids,
                           {"source": "seeds", "crf": crf}, out, workers=1, log=lambda s: None)
    assert t["source"] == "seeds"
    for iid in ids:
        p, cids = dists[iid]
        if crf and len(cids) > 1:
            d = dcrf.DenseCRF2D(30, 20, len(cids))
            d.setUnaryEnergy(np.ascontiguousarray(U.unary_from_softmax(p.astype(np.float32))))
            d.addPairwiseGaussian(sxy=1, compat=3)
            d.addPairwiseBilateral(sxy=67, srgb=3, compat=4,
                                   rgbim=np.ascontiguousarray(load_image(tmp_path / "ds", iid)))
            q = np.array(d.inference(10)).reshape(len(cids), 20, 30)
        else:
            q = p
        ref = cids[q.argmax(0)]
        got = np.asarray(Image.open(out / f"{iid}.png"))
        top = np.sort(np.concatenate([q, np.zeros_like(q[:1])]), 0)
        sure = top[-1] > top[-2] * (1 + 1e-2)      # float16 storage may flip near-ties only
        assert sure.mean() > 0.9 and (got[sure] == ref[sure]).all(), iid
        if len(cids) > 1:
            assert len(np.unique(got)) > 1


def test_seeds_without_the_distribution_are_refused_before_writing(tmp_path):
    """E.g. `bpm_upsample: ratio` seeds, or another method's: the error names the file and
    both fixes, and no output (not even a temporary folder) is left."""
    from pipeline.steps.pseudo import make_pseudo_labels
    _, ids = make_voc(tmp_path / "ds", n=3)
    _seeds_h5(tmp_path / "seeds.h5", np.random.default_rng(1), ids, (20, 30), keys=())
    with pytest.raises(StorageError) as e:
        make_pseudo_labels(tmp_path / "seeds.h5", "probs", tmp_path / "ds", ids,
                           {"source": "seeds"}, tmp_path / "pseudo", log=lambda s: None)
    msg = str(e.value)
    assert str(tmp_path / "seeds.h5") in msg and "bpm_upsample: probs" in msg and "source: refined" in msg
    assert not list(tmp_path.glob("pseudo*"))


def test_source_is_validated():
    from pipeline.io.config import ConfigError
    from pipeline.io.settings import MakePseudoLabels
    assert MakePseudoLabels.from_params({}).source == "refined"
    with pytest.raises(ConfigError, match="one of refined, seeds"):
        MakePseudoLabels.from_params({"source": "seed"})
