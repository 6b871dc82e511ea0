"""Distillation: the RID loss and schedule, the methods it is compared with, the distiller.

* :mod:`~rid_fast.distill.rid` — :class:`RIDLoss` (filters, heads, redundancy term; the default
  and the paper's variant);
* :mod:`~rid_fast.distill.schedule` — :class:`RIDSchedule` (the multi-level schedule: which phase
  each epoch or step is in, and how long a run must be for a given number of student updates);
* :mod:`~rid_fast.distill.methods` — no-KD, KD, FitNets, VID, CRD and RID behind one interface,
  registered by name;
* :mod:`~rid_fast.distill.distiller` — :class:`Distiller`: a student, a frozen teacher and a
  method, for one training step at a time.
"""

from rid_fast.distill.distiller import Distiller, RIDDistiller
from rid_fast.distill.rid import RIDLoss, RIDSchedule

__all__ = ["Distiller", "RIDDistiller", "RIDLoss", "RIDSchedule"]
