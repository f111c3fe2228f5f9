import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCSAMPLE = Path(os.environ.get("WSSS_VOCSAMPLE",
                                REPO.parent / "shared" / "data" / "voc2012-sample" / "VOC2012"))


@pytest.fixture(scope="session")
def vocsample_root() -> Path:
    if not (VOCSAMPLE / "JPEGImages").is_dir():
        pytest.fail(f"the real VOC sample is expected at {VOCSAMPLE} (set WSSS_VOCSAMPLE)")
    return VOCSAMPLE


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small CPU ops in unit tests run far faster single-threaded on a 2-core machine shared
    with the stage subprocesses (2 threads on 2 busy cores measured ~15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
