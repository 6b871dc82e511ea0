"""Checkpoints that never lose work and cannot silently lie.

A checkpoint is a torch file holding one mapping, the *envelope*::

    {"format": "rid_fast.checkpoint", "version": 1, "kind": "run state" | "teacher",
     "sha256": <digest of kind and content>, "content": <what was saved>}

* written atomically (:mod:`rid_fast.train.atomic`), so a crash mid-write leaves the previous
  checkpoint intact;
* read with ``torch.load(weights_only=True)``: only tensors and plain Python values are
  unpickled, never arbitrary objects (:func:`rng_state` stores NumPy's generator as a tensor for
  this reason);
* verified: the SHA-256 of the content (every tensor's dtype, shape and bytes, every key and
  value, in order) is stored with it and recomputed on load, so a flipped byte inside a tensor is
  an error, not a silently different run. Anything wrong with a file — missing, empty,
  truncated, random bytes, a torch file rid_fast did not write, a file of another kind, a digest
  mismatch — raises :class:`CheckpointError` naming the file.

:func:`rng_state` / :func:`set_rng_state` capture Python's, NumPy's and torch's (CPU and CUDA)
generators, so a resumed run draws the same numbers an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rid_fast.train.atomic import replace_atomically

__all__ = [
    "CheckpointError",
    "RUN_STATE",
    "TEACHER",
    "save_atomic",
    "load",
    "load_newest",
    "content_digest",
    "rng_state",
    "set_rng_state",
]

FORMAT = "rid_fast.checkpoint"
VERSION = 1
#: Kinds of checkpoint: a training run's complete state, and a trained teacher (the cache).
RUN_STATE = "run state"
TEACHER = "teacher"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def _feed(digest, obj: Any) -> None:
    """Feed a canonical encoding of ``obj`` to ``digest``: a type tag, then the value (lengths
    first, so no two different objects encode alike)."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().to("cpu").contiguous().reshape(-1)
        header = f"T{tensor.dtype}{tuple(obj.shape)}{tensor.numel()};"
        digest.update(header.encode())
        digest.update(tensor.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, list | tuple):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, str):
        data = obj.encode()
        digest.update(f"S{len(data)};".encode() + data)
    elif isinstance(obj, bytes):
        digest.update(f"Y{len(obj)};".encode() + obj)
    elif isinstance(obj, bool) or obj is None:
        digest.update(f"B{obj};".encode())
    elif isinstance(obj, int):
        digest.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        digest.update(f"F{obj.hex()};".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors and plain Python values only; got {type(obj).__name__}")


def content_digest(kind: str, content: Any) -> str:
    """SHA-256 (hex) of ``kind`` and ``content``: tensors by dtype, shape and bytes, containers
    by their items in order, numbers exactly (floats by their hex form)."""
    digest = hashlib.sha256()
    _feed(digest, kind)
    _feed(digest, content)
    return digest.hexdigest()


def save_atomic(
    content: Any, path: str | Path, *, kind: str = RUN_STATE, keep_previous: str | Path | None = None
) -> None:
    """Write ``content`` (tensors and plain Python values) to ``path`` with its digest, atomically.
    With ``keep_previous``, the file already at ``path`` is kept under that name."""
    envelope = {"format": FORMAT, "version": VERSION, "kind": kind, "sha256": content_digest(kind, content),
                "content": content}  # fmt: skip
    replace_atomically(path, lambda file: torch.save(envelope, file), keep_previous=keep_previous)


def load(path: str | Path, *, kind: str = RUN_STATE, map_location: str | torch.device = "cpu") -> Any:
    """The content saved at ``path`` by :func:`save_atomic`, after checking that the file is a
    rid_fast checkpoint of ``kind`` whose content matches its digest; else :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        envelope = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, empty or random bytes fail in the zip reader or the unpickler
        # Torch's own message is long and can advise weights_only=False, which this file must not get.
        raise CheckpointError(
            f"{path} is damaged: torch cannot read it ({type(error).__name__}: truncated, empty or not a torch file)"
        ) from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a rid_fast checkpoint: a torch file without the digest rid_fast stores")
    if envelope.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {envelope.get('kind')}, not a {kind}")
    if content_digest(kind, envelope.get("content")) != envelope.get("sha256"):
        raise CheckpointError(f"{path} is damaged: its content does not match the digest stored with it")
    return envelope["content"]


def load_newest(paths: list[str | Path], *, kind: str = RUN_STATE, age=lambda content: content["epoch"]):
    """The intact checkpoint among ``paths`` with the largest ``age(content)`` (the first of the
    paths on a tie), as ``(content, path, problems)``: ``problems`` lists every file that exists
    but could not be used. Raises :class:`CheckpointError` naming every file when none can."""
    intact, problems = [], []
    for path in map(Path, paths):
        if not path.exists():
            continue
        try:
            intact.append((load(path, kind=kind), path))
        except CheckpointError as error:
            problems.append(str(error))
    if not intact:
        found = "; ".join(problems) if problems else "none of them exists"
        raise CheckpointError(f"no intact checkpoint among {', '.join(str(p) for p in paths)}: {found}")
    content, path = max(intact, key=lambda item: age(item[0]))  # max keeps the first of equals
    return content, path, problems


def rng_state() -> dict:
    """Python's, NumPy's and torch's generator states, as tensors and plain values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        # Python's 625 state words as one tensor, not 625 objects to pickle and digest each time.
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
