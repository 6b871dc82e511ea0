"""What sits under the estimators: the reductions of the score matrix and how one is chosen.

* :mod:`~rid_fast.ops.dispatch` — input validation and implementation choice, in one place;
* :mod:`~rid_fast.ops.library` — the ``torch.library`` custom ops with fakes and autograd, routing
  to a backend;
* :mod:`~rid_fast.ops.streaming` — the streaming PyTorch backend (the fast CPU path);
* :mod:`~rid_fast.ops.common` — constants and helpers shared with the Triton backend,
  :mod:`rid_fast.kernels`.
"""
