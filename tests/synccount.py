"""Count the calls that would make a CUDA device synchronise with the host, on a CPU-only machine.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` finds them; without a GPU nothing synchronises, so
this counts the calls that would: reading a value on the host (``item``, ``bool``, ``int``, ``float``,
``tolist``, ``numpy``, ``cpu``), ops whose output size depends on the data (``nonzero``, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``), ``equal``/``allclose``, and explicit
``torch.cuda.synchronize`` / stream / event waits.

    from tests.synccount import count_syncs

    with count_syncs() as syncs:
        loss = masked_linear_cross_entropy(h, w, y, assume_valid=True)
        loss.backward()
    assert syncs.count == 0, syncs.report()

Two layers catch them: a ``TorchDispatchMode`` sees every aten op (forward and backward on the calling
thread), and patched Python methods catch what never reaches the dispatcher (``tolist`` and ``numpy``
read CPU memory directly). A host read through ``item()`` is counted once, as ``_local_scalar_dense``.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that make the host wait for the device: scalar reads and data-dependent output sizes.
SYNC_OPS = {
    "aten::_local_scalar_dense",  # item(), bool(), int(), float(), and everything built on them
    "aten::nonzero",  # (nonzero_static is not: its size is given)
    "aten::masked_select",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::allclose",
}
# Python-level methods that read device memory on the host without going through the dispatcher.
TENSOR_METHODS = ("tolist", "numpy", "cpu")
CUDA_WAITS = (
    (torch.cuda, "synchronize"),
    (torch.cuda.Stream, "synchronize"),
    (torch.cuda.Event, "synchronize"),
    (torch.cuda.Stream, "query"),
    (torch.cuda.Event, "query"),
)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" not in name and not name.endswith("synccount.py") and "contextlib" not in name:
            return f"{name}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """The synchronising calls made while active: ``count`` and ``calls`` (name, caller) in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self._depth = 0  # > 0 inside a patched method: its own aten ops are not counted again

    @property
    def count(self) -> int:
        return len(self.calls)

    def report(self) -> str:
        lines = [f"{self.count} synchronising call(s):"] + [
            f"  {name} at {where}" for name, where in self.calls
        ]
        return "\n".join(lines)

    def _record(self, name: str) -> None:
        self.calls.append((name, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if self._depth == 0 and (
            name in SYNC_OPS
            or (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None)
        ):
            self._record(name)
        return func(*args, **(kwargs or {}))

    def _wrap(self, name, original):
        counter = self

        def wrapper(*args, **kwargs):
            counter._record(name)
            counter._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth -= 1

        return wrapper

    def _wait(self, name):
        def wrapper(*args, **kwargs):
            self._record(name)  # never actually waits: on CPU there is nothing to wait for

        return wrapper


@contextlib.contextmanager
def count_syncs():
    """Context manager yielding a ``SyncCounter`` that records every synchronising call made inside."""
    counter = SyncCounter()
    saved = [(torch.Tensor, m, getattr(torch.Tensor, m)) for m in TENSOR_METHODS]
    saved += [(owner, m, getattr(owner, m)) for owner, m in CUDA_WAITS]
    try:
        for m in TENSOR_METHODS:
            setattr(torch.Tensor, m, counter._wrap(f"Tensor.{m}", getattr(torch.Tensor, m)))
        for owner, m in CUDA_WAITS:
            setattr(owner, m, counter._wait(f"{owner.__name__}.{m}"))
        with counter:
            yield counter
    finally:
        for owner, m, original in saved:
            setattr(owner, m, original)
