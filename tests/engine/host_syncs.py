"""Counting device-to-host synchronizations on the CPU, where no device exists to wait for.

`HostSyncCounter` is a `TorchDispatchMode` plus a few patched `torch.Tensor` methods. The CPU stands
for the accelerator; the counter records every operation that would make the host wait for it:

- reading a value on the host: `.item()`, `bool()` / `int()` / `float()` of a tensor (Python control
  flow on tensors), all of which reach `aten._local_scalar_dense`, and `.tolist()`, `.numpy()`, `.cpu()`;
- operations whose output size depends on the values (`nonzero`, boolean-mask indexing, `unique`,
  `masked_select`, `repeat_interleave` without `output_size`, `bincount`).

Tensors are "device" tensors unless they were produced on the host: by a counted transfer (`.cpu()`),
from Python or NumPy data without a `device=` argument or with the literal `device="cpu"`
(`torch.tensor`, `torch.as_tensor`), or by an operation whose tensor inputs are all host tensors.
`.to(<device>)` of a host tensor is a move onto the device (host to device: no wait). Reading a host
tensor is not counted, as on an accelerator it costs no wait. Each record names the innermost frame
outside torch (file and function), so a failing test says where a new synchronization came from.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_DEPENDENT = {
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten._unique.default, aten.bincount.default,
}
MASK_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}
TORCH_DIR = str(Path(torch.__file__).parent)
THIS_FILE = str(Path(__file__))



def _site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(TORCH_DIR) and frame.filename != THIS_FILE:
            parts = Path(frame.filename).parts
            for anchor in ("detr_lab", "lightning", "tests"):
                if anchor in parts:
                    parts = parts[len(parts) - parts[::-1].index(anchor) - 1:]
                    break
            return f"{'/'.join(parts)}:{frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Use as a context manager around the code; counting happens only while `active` is True.
    `events` counts synchronizations by site ("path:function")."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.events: Counter[str] = Counter()
        self.host = WeakIdKeyDictionary()
        self._saved: dict[tuple[object, str], object] = {}

    # --------------------------------------------------------------------------- host bookkeeping
    def _is_host(self, tensor: object) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor in self.host

    def _mark_host(self, value: object) -> object:
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor):
                self.host[leaf] = True
        return value

    def _record(self, tensor: object) -> None:
        if self.active and not self._is_host(tensor):
            self.events[_site()] += 1

    # --------------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        syncs = func in READS or func in DATA_DEPENDENT
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            syncs = True
        if func in MASK_INDEXING:
            indices = args[1] if len(args) > 1 else []
            syncs = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
        if syncs and self.active and not all(self._is_host(t) for t in tensors):
            self.events[_site()] += 1
        out = func(*args, **kwargs)
        if tensors and all(self._is_host(t) for t in tensors):
            self._mark_host(out)
        return out

    # --------------------------------------------------------------------------- patched methods
    def _patch(self, owner: object, name: str, wrapper) -> None:
        self._saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, wrapper)

    def __enter__(self):
        counter = self
        cpu, to, numpy, tolist = torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.numpy, torch.Tensor.tolist
        tensor, as_tensor = torch.tensor, torch.as_tensor

        def patched_cpu(self, *args, **kwargs):
            counter._record(self)
            out = cpu(self, *args, **kwargs)
            # On the CPU `.cpu()` returns the tensor itself: a copy keeps the device tensor unmarked.
            return counter._mark_host(out.clone() if out is self else out)

        def patched_to(self, *args, **kwargs):
            # The CPU stands for the accelerator: `.to(<cpu device>)` is a move onto it (host to device,
            # no wait), so a host tensor's copy becomes a device tensor. `.cpu()` is the way back.
            out = to(self, *args, **kwargs)
            if out is self and counter._is_host(self):
                target = kwargs.get("device", args[0] if args else None)
                if isinstance(target, (str, torch.device)):
                    return out.clone() if counter.active else out
            return out

        def patched_numpy(self, *args, **kwargs):
            counter._record(self)
            return numpy(self, *args, **kwargs)

        def patched_tolist(self):
            counter._record(self)
            return tolist(self)

        def on_host(kwargs) -> bool:  # no device, or the literal "cpu" (the host, by intent)
            return kwargs.get("device") in (None, "cpu")

        def patched_tensor(*args, **kwargs):
            out = tensor(*args, **kwargs)
            return counter._mark_host(out) if on_host(kwargs) else out

        def patched_as_tensor(*args, **kwargs):
            out = as_tensor(*args, **kwargs)
            if not on_host(kwargs) or (args and isinstance(args[0], torch.Tensor)):
                return out
            return counter._mark_host(out)

        self._patch(torch.Tensor, "cpu", patched_cpu)
        self._patch(torch.Tensor, "to", patched_to)
        self._patch(torch.Tensor, "numpy", patched_numpy)
        self._patch(torch.Tensor, "tolist", patched_tolist)
        self._patch(torch, "tensor", patched_tensor)
        self._patch(torch, "as_tensor", patched_as_tensor)
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
