import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VOCSAMPLE = Path(os.environ.get("WSSS_VOCSAMPLE",
                                REPO.parent / "shared" / "data" / "voc2012-sample" / "VOC2012"))


@pytest.fixture(scope="session")
def vocsample_root() -> Path:
    if not (VOCSAMPLE / "JPEGImages").is_dir():
        pytest.fail(f"the real VOC sample is expected at {VOCSAMPLE} (set WSSS_VOCSAMPLE)")
    return VOCSAMPLE
