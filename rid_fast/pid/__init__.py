r"""Partial information decomposition (PID) of what a teacher and a student know about the label.

:mod:`rid_fast.pid.broja` solves the BROJA PID of discrete distributions, batched and certified;
:mod:`rid_fast.pid.protocol` measures it for continuous representations the RID paper's way.
"""

from rid_fast.pid.broja import LN2, PID, broja, broja_batch, check_distribution, mutual_informations
from rid_fast.pid.protocol import discretize, joint_distribution, measure

__all__ = [
    "PID",
    "broja",
    "broja_batch",
    "check_distribution",
    "mutual_informations",
    "discretize",
    "joint_distribution",
    "measure",
    "LN2",
]
