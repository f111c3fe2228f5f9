"""Start a stage module on G GPUs: ``python -m stages._launch G stages.train_cls ARGS...``.

G > 1: ``python -m torch.distributed.run --standalone --nproc_per_node=G -m MODULE ARGS``
(torchrun: one process per GPU, see :mod:`pipeline.engine.distributed`); G <= 1 (one GPU or CPU):
``python -m MODULE ARGS``, exactly the command used without this launcher. The Snakefile
passes the rule's ``resources: gpu`` as G, so the number of GPUs never enters the rule's
params (changing it does not rerun anything: the results are the same up to float order).
"""
from __future__ import annotations

import os
import sys


def command(gpus: int, module: str, args: list[str], python: str = sys.executable) -> list[str]:
    """The argv that runs ``module`` with ``args`` on ``gpus`` GPUs (see module doc).

    Raises:
        ValueError: ``gpus`` negative or ``module`` not a ``stages.`` module.
    """
    if int(gpus) < 0:
        raise ValueError(f"number of GPUs must be >= 0, got {gpus}")
    if not module.startswith("stages."):
        raise ValueError(f"the launcher runs stage modules (stages.<name>), got {module!r}")
    if int(gpus) > 1:
        return [python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={int(gpus)}", "-m", module, *args]
    return [python, "-m", module, *args]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m stages._launch GPUS stages.<name> [ARGS...]")
    cmd = command(int(argv[0]), argv[1], argv[2:])
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
