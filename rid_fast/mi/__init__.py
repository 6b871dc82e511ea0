"""Mutual-information estimators: the public surface.

* :mod:`~rid_fast.mi.functional` — the estimators as functions of ``(x, y)`` (InfoNCE, NWJ, DV,
  SMILE, JS, ``mi_bound``); every other entry point goes through them;
* :mod:`~rid_fast.mi.estimators` — the same estimators as modules with learnable critics (and MINE);
* :mod:`~rid_fast.mi.critics` — the critics that score pairs;
* :mod:`~rid_fast.mi.reference` — the plain-PyTorch oracle the fast paths are tested against.
"""

from rid_fast.mi import critics, estimators, functional, reference
from rid_fast.mi.functional import mi_bound

__all__ = ["critics", "estimators", "functional", "reference", "mi_bound"]
