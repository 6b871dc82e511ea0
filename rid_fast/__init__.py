"""rid_fast: fast Redundant Information Distillation (RID) and mutual-information estimators.

Quick start::

    >>> import torch, rid_fast
    >>> x = torch.randn(128, 32); y = x + 0.3 * torch.randn(128, 32)
    >>> estimate = rid_fast.functional.infonce(x, y, temperature=0.2, critic="cosine")
"""

from rid_fast import critics, estimators, functional
from rid_fast.distiller import RIDDistiller
from rid_fast.functional import mi_bound
from rid_fast.rid import RIDLoss, RIDSchedule

__version__ = "0.1.0"

__all__ = ["__version__", "critics", "estimators", "functional", "mi_bound", "RIDLoss", "RIDSchedule", "RIDDistiller"]
