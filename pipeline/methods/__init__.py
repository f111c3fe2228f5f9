"""Method plug-in registry: ``get_method(name)`` for the ``{method}`` wildcard."""
from __future__ import annotations

from pipeline.methods.acr import ACR
from pipeline.methods.afa import AFA
from pipeline.methods.base import Method
from pipeline.methods.cam import CAM
from pipeline.methods.mcc import MCC
from pipeline.methods.smaf import SMAF
from pipeline.methods.vitpcm import ViTPCM

METHODS: dict[str, type[Method]] = {"acr": ACR, "afa": AFA, "cam": CAM, "mcc": MCC,
                                    "smaf": SMAF, "vitpcm": ViTPCM}


def get_method(name: str) -> Method:
    """Instantiate a method plug-in.

    Raises:
        KeyError: unknown name (message lists the known methods).
    """
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]()
