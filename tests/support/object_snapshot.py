"""What a host object is made of, to tell whether anything rebound or mutated it (tests only).

``snapshot(obj)`` walks every attribute of an object and of what it holds (dicts, lists, tuples, sets,
torch modules and any other object with a ``__dict__``: a ComfyUI ModelPatcher, VAE, BaseModel, their
model_options, patches, wrappers, hooks, each module's attention function and forward), and records each
plain value (number, string, dtype, device) by value and everything else by identity. Two snapshots
compare equal when nothing was rebound, added or removed anywhere below the object; ``changes(a, b)``
lists the paths that differ. Functions, classes, modules and tensors are recorded, not entered.
"""
from __future__ import annotations

import types
from typing import Dict, List

import torch

_PLAIN = (int, float, str, bytes, bool, type(None), torch.dtype, torch.device)
_LEAVES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type, torch.Tensor)


def snapshot(obj, name: str = "obj") -> Dict[str, object]:
    out: Dict[str, object] = {}
    entered = set()

    def visit(path: str, value) -> None:
        if isinstance(value, _PLAIN):
            out[path] = value
            return
        if isinstance(value, types.MethodType):  # a bound method is made anew on each access: its parts
            out[path] = ("method", id(value.__func__), id(value.__self__))
            return
        out[path] = (type(value).__qualname__, id(value))
        if isinstance(value, _LEAVES) or id(value) in entered:
            return
        entered.add(id(value))
        if isinstance(value, dict):
            for key, item in list(value.items()):
                visit(f"{path}[{key!r}]", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{path}[{i}]", item)
        elif isinstance(value, (set, frozenset)):
            out[path + "{}"] = sorted(repr(v) for v in value)
        elif hasattr(value, "__dict__"):
            for key, item in list(vars(value).items()):
                visit(f"{path}.{key}", item)

    visit(name, obj)
    return out


def changes(before: Dict[str, object], after: Dict[str, object]) -> List[str]:
    """The paths that were added, removed or changed (at most 20, for a readable failure)."""
    paths = sorted(p for p in before.keys() | after.keys() if before.get(p, "<absent>") != after.get(p, "<absent>"))
    return [f"{p}: {before.get(p, '<absent>')} -> {after.get(p, '<absent>')}" for p in paths[:20]]
