"""Loading and converting IconMatting weights, never executing pickled code.

Accepted files:
* the released checkpoint: a PyTorch Lightning ``.ckpt`` whose ``state_dict`` holds the
  trainable weights under ``in_context_decoder.*`` (and possibly frozen ``feature_extractor.*``
  SD weights, which are ignored: SD is loaded from its own files);
* our ``.safetensors`` (written by :func:`convert_checkpoint`), keys of ``IconMattingHead``; a head
  written by a training run also carries what made it (:func:`training_metadata`: settings, data,
  the fingerprint of the SD weights it was trained with).

``.ckpt``/``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``. Lightning
checkpoints can hold small non-tensor objects (e.g. a hyper-parameter dict); if the strict loader
refuses one, the file is read again with an unpickler that resolves *no* class or function from
outside a short allow-list: anything else becomes an inert placeholder, so no code runs.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .config import IconMattingConfig
from .matting_head import IconMattingHead

# (reference-key prefix, our prefix); "{i}" stands for a layer index kept as is
_PREFIX_PAIRS: List[Tuple[str, str]] = [
    ("in_context_decoder.in_context_fusion.attn_module.norm.", "similarity.token_norm."),
    ("in_context_decoder.in_context_fusion.attn_module_list.{i}.", "similarity.propagation.{i}."),
    ("in_context_decoder.in_context_fusion.ft_module_list.{i}.", "fusion.feature_convs.{i}."),
    ("in_context_decoder.in_context_fusion.ft_attn_module_list.{i}.", "fusion.guided_convs.{i}."),
    ("in_context_decoder.in_context_fusion.fusion.module_list.0.conv.", "fusion.scale_fusion.conv."),
    ("in_context_decoder.detail_decoder.convstream.convs.{i}.", "detail.image_convs.{i}."),
    ("in_context_decoder.detail_decoder.fusion_blks.{i}.", "detail.fuse_blocks.{i}."),
    ("in_context_decoder.detail_decoder.matting_head.matting_convs.", "detail.alpha_head."),
]


def _rules(pairs, forward: bool):
    """(regex, replacement) rules for one direction of the prefix table."""
    rules = []
    for ref, ours in pairs:
        src, dst = (ref, ours) if forward else (ours, ref)
        rules.append((re.escape(src).replace(re.escape("{i}"), r"(\d+)"), dst.replace("{i}", r"\1")))
    return rules


_REFERENCE_TO_OURS = _rules(_PREFIX_PAIRS, forward=True)
# keys of the reference model that carry no IconMattingHead weight
IGNORED_REFERENCE_PREFIXES = ("feature_extractor.", "loss_function.")
EMPTY_PROMPT_KEY = "feature_extractor.prompt_embeds"
CONFIG_METADATA_KEY = "iconmatting_config"
TRAINING_METADATA_KEY = "iconmatting_training"


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file and what to do."""


def _rename(key: str, rules) -> Optional[str]:
    for pattern, repl in rules:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    return None


def reference_to_ours(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Reference (Lightning) keys -> IconMattingHead keys. Returns (mapped, unmapped keys)."""
    mapped, unmapped = {}, []
    for key, value in state_dict.items():
        if key.startswith(IGNORED_REFERENCE_PREFIXES):
            continue
        new = _rename(key, _REFERENCE_TO_OURS)
        if new is None:
            unmapped.append(key)
        else:
            mapped[new] = value
    return mapped, unmapped


class _Placeholder(dict):
    """Stands in for any object whose class is not allow-listed; keeps nothing executable.

    A dict so that pickled dict/list subclasses (e.g. Lightning's AttributeDict, defaultdict)
    can be filled in; list-style appends are kept aside.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def append(self, item):
        self.setdefault("__items__", []).append(item)

    def extend(self, items):
        for item in items:
            self.append(item)


class _InertUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch", "device"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or name in ("float32", "float16", "bfloat16")):
            return super().find_class(module, name)
        return _Placeholder


def _inert_load(file, **kwargs):
    return _InertUnpickler(file, **kwargs).load()


class _InertPickleModule:
    """What torch.load may use as ``pickle_module``: every unpickling goes through _InertUnpickler."""

    Unpickler = _InertUnpickler
    load = staticmethod(_inert_load)
    __name__ = "iconmatting_inert_pickle"


def _torch_load(path: Path) -> dict:
    zipped = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError:
        pass
    # weights_only refused a non-tensor object; read again with nothing executable resolved
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_InertPickleModule, mmap=zipped)


def read_state_dict(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and (safetensors) metadata of a weights file, without executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        obj = _torch_load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt / truncated / not a checkpoint
        raise CheckpointError(
            f"Cannot read the weights file {path} ({_reason(exc)}). "
            "It is probably incomplete or not a weights file: download it again."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no weights (no state dict of tensors). Check that it is the file you meant.")
    return dict(obj), {}


def _reason(exc: Exception) -> str:
    """An exception as a short clause: 'EOFError', 'UnpicklingError: invalid load key'."""
    text = str(exc).strip().rstrip(".").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def head_state_dict(path) -> Tuple[Dict[str, torch.Tensor], Optional[IconMattingConfig], Optional[torch.Tensor]]:
    """IconMattingHead weights from either layout, plus the config (ours only) and, if the file
    carries it, the empty-prompt embedding. Unknown keys raise CheckpointError."""
    state, meta = read_state_dict(path)
    config = IconMattingConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY])) if CONFIG_METADATA_KEY in meta else None
    prompt = state.pop(EMPTY_PROMPT_KEY, None)
    if any(k.startswith("in_context_decoder.") for k in state):
        state, unmapped = reference_to_ours(state)
        if unmapped:
            raise CheckpointError(
                f"{path} has {len(unmapped)} keys the IconMatting model does not know (e.g. {_short(unmapped, 3)}). "
                "Use the IconMatting release icm.ckpt or its .safetensors conversion."
            )
    elif not state:
        raise CheckpointError(f"{path} holds no weights. Use the IconMatting release icm.ckpt or its .safetensors conversion.")
    return state, config, prompt


def training_metadata(path) -> dict:
    """The training record of a head file written by ``iconmatting_core.training`` (JSON under
    :data:`TRAINING_METADATA_KEY`: settings and their history, data summary, ``sd_fingerprint``, step),
    read from the header alone; {} for any other file (the released ``.ckpt``, a conversion)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {}).get(TRAINING_METADATA_KEY, "{}"))
    except Exception:  # noqa: BLE001 - unreadable here is unreadable for the loader, which says so
        return {}
    return record if isinstance(record, dict) else {}


def _short(keys: Iterable[str], n: int = 3) -> str:
    """The first n of keys, comma-separated (the count is given by the caller)."""
    return ", ".join(sorted(keys)[:n])


def read_head_weights(path, config: Optional[IconMattingConfig] = None):
    """The head weights of a file, checked against the model: (state dict, config, empty-prompt
    embedding or None). Missing or unexpected keys, or tensors of the wrong shape, raise
    CheckpointError naming the file."""
    state, file_config, prompt = head_state_dict(path)
    config = config or file_config or IconMattingConfig()
    with torch.device("meta"):
        expected = IconMattingHead(config).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [
            f"{len(keys)} {what} (e.g. {_short(keys)})"
            for keys, what in ((missing, "keys missing"), (unexpected, "unexpected keys"), (wrong, "tensors of the wrong shape"))
            if keys
        ]
        raise CheckpointError(
            f"{path} does not fit the IconMatting model ({config.image_size}px): {'; '.join(problems)}. "
            "Use the IconMatting release icm.ckpt or its .safetensors conversion."
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(
            f"{path} is broken: {len(broken)} of its tensors hold NaN/inf values (e.g. {_short(broken)}). "
            "Download the IconMatting weights (icm.ckpt) again."
        )
    return state, config, prompt


def load_head(path, config: Optional[IconMattingConfig] = None, operations=None) -> Tuple[IconMattingHead, Optional[torch.Tensor]]:
    """Build an IconMattingHead (from ``operations``, default torch layers) and load a weights file
    strictly. Returns (head, empty-prompt embedding or None); see :func:`read_head_weights`."""
    state, config, prompt = read_head_weights(path, config)
    head = IconMattingHead(config) if operations is None else IconMattingHead(config, operations)
    head.load_state_dict(state, strict=True)
    return head.eval(), prompt


def save_head(head: IconMattingHead, path, empty_prompt_embedding: Optional[torch.Tensor] = None) -> None:
    """Write our ``.safetensors`` (config stored in the metadata), atomically and with the user's
    file mode (``files.write_safetensors``)."""
    from .files import write_safetensors

    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    if empty_prompt_embedding is not None:
        tensors[EMPTY_PROMPT_KEY] = empty_prompt_embedding.detach().float().contiguous().cpu()
    write_safetensors(path, tensors, {CONFIG_METADATA_KEY: json.dumps(head.config.to_dict())})


def convert_checkpoint(src, dst, config: Optional[IconMattingConfig] = None) -> Path:
    """Released ``.ckpt`` (or any accepted file) -> our ``.safetensors`` (see :func:`save_head`); returns dst."""
    head, prompt = load_head(src, config)
    save_head(head, dst, prompt)
    return Path(dst)
