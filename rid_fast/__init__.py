"""rid_fast: fast Redundant Information Distillation (RID) and mutual-information estimators.

The package is layered; imports point only downward (``tests/test_layering.py`` checks it):

* :mod:`rid_fast.mi` — the estimators' public surface: functional bounds, modules, critics, the
  plain-PyTorch oracle;
* :mod:`rid_fast.ops` — under it: validation and implementation choice, the ``torch.library``
  ops, the streaming CPU backend, and the helpers the backends share; :mod:`rid_fast.kernels`
  (Triton) is the other backend;
* :mod:`rid_fast.distill` — the RID loss and schedule, the distillation methods, the distiller;
* :mod:`rid_fast.pid` — the BROJA solver and the paper's measurement protocol;
* :mod:`rid_fast.train` — configs, the training loop, comparisons, checkpoints, data, models, plots;
* :mod:`rid_fast.cli` (``rid-fast``) and :mod:`rid_fast.bench` on top.

Quick start::

    >>> import torch, rid_fast
    >>> x = torch.randn(128, 32); y = x + 0.3 * torch.randn(128, 32)
    >>> estimate = rid_fast.functional.infonce(x, y, temperature=0.2, critic="cosine")
"""

import sys

from rid_fast import pid
from rid_fast.distill import Distiller, RIDDistiller, RIDLoss, RIDSchedule
from rid_fast.mi import critics, estimators, functional, mi_bound
from rid_fast.train import models

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "critics",
    "estimators",
    "functional",
    "mi_bound",
    "pid",
    "RIDLoss",
    "RIDSchedule",
    "Distiller",
    "RIDDistiller",
]

# The import paths of the flat layout that users write (``from rid_fast.functional import
# infonce``, ``from rid_fast.models import CNN``) name the modules where they now live.
for _name, _module in {
    "functional": functional,
    "estimators": estimators,
    "critics": critics,
    "models": models,
}.items():
    sys.modules[f"{__name__}.{_name}"] = _module
