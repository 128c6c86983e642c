"""Reference contexts as files: encode a reference once, matte with it anywhere later.

A context file is a ``.safetensors`` file: the tensor fields of :class:`ReferenceContext`
(``tokens`` [N, C] float32, stored exactly, so a context loaded from file gives the same alphas as
one recomputed, bit for bit) and, in the header's JSON metadata (key ``iconmatting_context``), the
other fields, a format version, the fingerprint of the model that made it, the sha256 of each
tensor's bytes (format 2) and any extra metadata of the caller (the command line stores the resize
mode and the weight files' names).

A file is checked in full before use (:func:`load_context`, :func:`read_context_file`): the
header's types, the tensors' checksums, dtypes and shapes against the header, token counts against
the tokens, finite values small enough for the head's token normalisation
(``matching.max_token_magnitude``), a seed the noise generator takes. Anything wrong raises
ContextFileError naming the file and the field. A file of format 1 carries no checksums, so damage
or tampering cannot be seen: it is refused unless the caller trusts it explicitly
(``trust_unverified``; ``matte --trust-unverified-context``). Whether a context fits the loaded
model (the weights' fingerprint, the model configuration) is :func:`check_fits`, the one home of
that message for every caller (command line, Ray workers, nodes).

The dataclass is serialised generically (``dataclasses.fields``: tensors to safetensors, the rest
to JSON), so a field added to ReferenceContext is saved and loaded without touching this module.

The fingerprint (:func:`model_fingerprint`) identifies the weights: sha256 over the matting
head's state dict and the feature extractor's ``fingerprint_tensors()`` (SD UNet and VAE input
convolutions): names, shapes and a few values of each, compared with a tolerance, so the same
weights match whichever host loaded them and in whichever precision (fp32, fp16 or bf16 runs of
one checkpoint share contexts). A context only fits the weights that made it; loading it with
others raises ContextFileError.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from .context import ReferenceContext

FORMAT_VERSION = 2  # 2: tensor checksums; files of version 1 (no checksums) load only when trusted explicitly
TRUST_FLAG = "--trust-unverified-context"
METADATA_KEY = "iconmatting_context"
MAX_HEADER_BYTES = 1_000_000


class ContextFileError(ValueError):
    """A context file that cannot be used here; the message names the file and what to do."""


FINGERPRINT_VERSION = "sig1"
_SAMPLES = 64  # values per tensor
# The same weights read in fp32, fp16 or bf16 differ by at most bf16's rounding (2^-8 relative) plus the
# float16 the samples are stored in; other weights (another checkpoint, a fine-tune) differ by far more.
_RTOL, _ATOL = 8e-3, 1e-6


def model_fingerprint(head: torch.nn.Module, extractor) -> str:
    """A signature of the IconMatting head and SD weights, equal for the same weights loaded by any
    host in any precision (fp32, fp16, bf16), and different for other weights.

    head: the matting head (its whole ``state_dict``); extractor: anything with
    ``fingerprint_tensors() -> {"unet.conv_in.weight", "vae.encoder.conv_in.weight"}``
    (SDFeatureExtractor, or a host's own extractor returning the same tensors).
    Format ``sig1:<sha256 of names and shapes, 16 hex>:<64 evenly spaced values per tensor, float16 hex>``;
    compare two with :func:`same_weights`, not ``==`` (hosts round weights differently).
    """
    tensors = {f"head.{k}": v for k, v in head.state_dict().items() if v.dtype.is_floating_point}
    tensors.update({f"sd.{k}": v for k, v in extractor.fingerprint_tensors().items()})
    structure, values = hashlib.sha256(), []
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        structure.update(f"{name}:{tuple(tensors[name].shape)}\n".encode())
        index = torch.linspace(0, flat.numel() - 1, min(_SAMPLES, flat.numel())).round().long().to(flat.device)
        values.append(flat[index].to("cpu", torch.float32))
    sample = torch.cat(values).to(torch.float16).numpy().tobytes().hex()
    return f"{FINGERPRINT_VERSION}:{structure.hexdigest()[:16]}:{sample}"


def same_weights(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two fingerprints describe the same weights (same tensors and shapes, values equal to
    the rounding of the precisions they were loaded in)."""
    if not a or not b or a.count(":") != 2 or b.count(":") != 2:
        return a == b
    (va, sa, xa), (vb, sb, xb) = a.split(":"), b.split(":")
    if va != vb or sa != sb or len(xa) != len(xb):
        return False
    ta = torch.from_numpy(np.frombuffer(bytes.fromhex(xa), dtype=np.float16).astype(np.float32))
    tb = torch.from_numpy(np.frombuffer(bytes.fromhex(xb), dtype=np.float16).astype(np.float32))
    return bool(torch.allclose(ta, tb, rtol=_RTOL, atol=_ATOL))


def fingerprint_label(fingerprint: Optional[str]) -> str:
    """A short name of a fingerprint for messages (12 hex digits)."""
    return hashlib.sha256(str(fingerprint).encode()).hexdigest()[:12]


def sd_fingerprint(extractor) -> str:
    """The fingerprint of the SD weights alone (no head): what a training run records in the heads
    it writes (``sd_fingerprint`` in :func:`checkpoint.training_metadata`)."""
    return model_fingerprint(torch.nn.Module(), extractor)


def other_sd_warning(head_path, extractor) -> Optional[str]:
    """One line when the head file was trained on SD weights other than ``extractor``'s (its training
    record's ``sd_fingerprint``); None when they are the same, or the file records none (the release)."""
    from .checkpoint import training_metadata

    trained = training_metadata(head_path).get("sd_fingerprint")
    if not trained:
        return None
    loaded = sd_fingerprint(extractor)
    if same_weights(trained, loaded):
        return None
    return (f"{Path(head_path).name} was trained on other Stable Diffusion weights (fingerprint "
            f"{fingerprint_label(trained)}) than the ones loaded now ({fingerprint_label(loaded)}): its mattes may "
            "be worse; load the SD 2.1 weights it was trained with")


def _to_json(value: Any, what: str):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, what) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, what) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"ReferenceContext field {what!r} holds a {type(value).__name__}, which a context file cannot store")


def _from_json(value: Any, hint):
    """JSON value -> the field's declared type (dataclasses, tuples, nested)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint.from_dict(value) if hasattr(hint, "from_dict") else hint(**value)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(v, args[0]) for v in value)
        if args and len(args) == len(value):
            return tuple(_from_json(v, a) for v, a in zip(value, args))
        return tuple(value)
    return value


def _split(context: ReferenceContext) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensor fields on the CPU, the other fields as JSON values) of a context."""
    if not isinstance(context, ReferenceContext):
        raise TypeError(f"context must be a ReferenceContext, got {type(context).__name__}")
    tensors: Dict[str, torch.Tensor] = {}
    fields: Dict[str, Any] = {}
    for f in dataclasses.fields(context):
        value = getattr(context, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            fields[f.name] = _to_json(value, f.name)
    return tensors, fields


def context_digest(context: ReferenceContext) -> str:
    """sha256 of everything a context holds (each tensor's bytes, every other field): equal for a
    context and the same context saved and loaded again, different when any token or field differs."""
    tensors, fields = _split(context)
    sums = {k: tensor_sha256(v) for k, v in tensors.items()}
    return hashlib.sha256(json.dumps({"fields": fields, "tensor_sha256": sums}, sort_keys=True).encode()).hexdigest()


def save_context(path, context: ReferenceContext, fingerprint: str, extra_metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``context`` to ``path`` (.safetensors) with the model ``fingerprint``; returns the path.
    Written atomically, with the user's file mode (``files.write_safetensors``).

    extra_metadata: JSON-serialisable values kept beside the context (e.g. ``{"resize_mode": "pad"}``),
    read back with :func:`read_context_metadata`.
    """
    from .files import write_safetensors

    tensors, fields = _split(context)
    header = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fields": fields,
        "tensor_dtypes": {k: str(v.dtype) for k, v in tensors.items()},
        "tensor_shapes": {k: list(v.shape) for k, v in tensors.items()},
        "tensor_sha256": {k: tensor_sha256(v) for k, v in tensors.items()},
        "extra": _to_json(dict(extra_metadata or {}), "extra_metadata"),
    }
    return write_safetensors(path, tensors, {METADATA_KEY: json.dumps(header)})


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (C order, as stored)."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def _bad(path: Path, field: str, problem: str) -> ContextFileError:
    return ContextFileError(f"{path}: {field} {problem}; the file is damaged or was not written by `encode`. "
                            "Encode the reference again.")


def _read_header(path: Path) -> dict:
    from safetensors import safe_open

    if path.is_dir():
        raise ContextFileError(f"{path} is a folder; give the context file itself (a .safetensors file made by `encode`).")
    if not path.is_file():
        raise ContextFileError(f"context file not found: {path}. Make one with `python -m iconmatting_core encode ... --out {path}`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ContextFileError(
            f"cannot read context file {path}: {type(exc).__name__}: {exc}. Is it a context file written by `encode`?"
        ) from exc
    if METADATA_KEY not in meta:
        raise ContextFileError(f"{path} is not an IconMatting context file (no {METADATA_KEY!r} metadata); make one with `encode`.")
    text = meta[METADATA_KEY]
    if len(text) > MAX_HEADER_BYTES:
        raise _bad(path, "the metadata", f"is {len(text)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, "the metadata", f"is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the metadata", f"is a JSON {type(header).__name__}, not an object")
    version = header.get("format_version")
    if type(version) is not int or version < 1:
        raise _bad(path, "format_version", f"is {version!r}, not a format number")
    if version > FORMAT_VERSION:
        raise ContextFileError(
            f"{path} has context format version {version}; this version of iconmatting_core reads up to "
            f"{FORMAT_VERSION}. Update the pack, or encode the reference again."
        )
    kinds = {"fingerprint": str, "fields": dict, "tensor_dtypes": dict, "extra": dict}
    if version >= 2:
        kinds.update(tensor_shapes=dict, tensor_sha256=dict)
    for key, kind in kinds.items():
        if key == "extra" and key not in header:
            header["extra"] = {}
        elif not isinstance(header.get(key), kind):
            got = "missing" if key not in header else f"a {type(header[key]).__name__}"
            raise _bad(path, key, f"is {got}, not a {kind.__name__}")
    for key in ("resize_mode", "matting_weights", "sd"):
        if key in header["extra"] and not isinstance(header["extra"][key], str):
            raise _bad(path, f"extra.{key}", f"is {header['extra'][key]!r}, not text")
    if header["extra"].get("resize_mode") not in (None, "pad", "stretch"):
        raise _bad(path, "extra.resize_mode", f"is {header['extra']['resize_mode']!r}, not pad or stretch")
    return header


def read_context_metadata(path) -> dict:
    """The file's header without its tensors: ``format_version``, ``fingerprint``, ``fields`` (the
    non-tensor ReferenceContext fields as JSON) and ``extra`` (the caller's extra_metadata)."""
    return _read_header(Path(path))


def check_fits(path, header: dict, context: ReferenceContext, fingerprint: str, config,
               loaded_by: str = "loaded now") -> None:
    """ContextFileError when the context file at ``path`` (its ``header`` and ``context``) was made
    with other weights than ``fingerprint`` or for another model configuration than ``config``
    (``loaded_by`` says whose model: "loaded now", "a Ray worker loaded")."""
    made_with = header.get("fingerprint")
    if not same_weights(made_with, fingerprint):
        extra = header.get("extra") or {}
        files = ", ".join(f"{k} {extra[k]}" for k in ("matting_weights", "sd") if extra.get(k))
        raise ContextFileError(
            f"{path} was encoded with other model weights (fingerprint {fingerprint_label(made_with)}"
            + (f": {files}" if files else "")
            + f") than the ones {loaded_by} (fingerprint {fingerprint_label(fingerprint)}). Load the IconMatting and "
            "Stable Diffusion 2.1 weights it was made with, or encode the reference "
            "again with these weights."
        )
    if config is not None and context.config != config:
        ours, theirs = context.config.to_dict(), config.to_dict()
        diff = ", ".join(f"{k} {ours[k]} instead of {theirs[k]}" for k in ours if ours[k] != theirs[k])
        raise ContextFileError(
            f"{path} was encoded for another model configuration than the weights {loaded_by} ({diff}); "
            "encode the reference again with these weights."
        )


def read_context_file(path, trust_unverified: bool = False) -> Tuple[ReferenceContext, dict]:
    """A context file checked in full, without a model: (context, header). A format-1 file (no
    checksums) raises ContextFileError unless ``trust_unverified``."""
    from safetensors import safe_open

    path = Path(path)
    header = _read_header(path)
    if header["format_version"] < 2 and not trust_unverified:
        raise ContextFileError(
            f"{path} is a context file of format {header['format_version']}, which carries no checksums: damage or "
            f"tampering cannot be detected. Encode the reference again (or, if you trust this file, `matte {TRUST_FLAG}` "
            "uses it anyway)."
        )
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _build(path, header, tensors), header


def load_context(path, expected_fingerprint: Optional[str] = None, trust_unverified: bool = False) -> ReferenceContext:
    """Read a context file (see :func:`read_context_file`). With ``expected_fingerprint`` (the
    loaded model's, e.g. ``IconMattingPipeline.fingerprint``), a context made with other weights
    raises ContextFileError (:func:`check_fits`), before its tensors are read."""
    path = Path(path)
    if expected_fingerprint is not None:
        header = _read_header(path)
        check_fits(path, header, None, expected_fingerprint, None)
    return read_context_file(path, trust_unverified)[0]


def _check_tensors(path: Path, header: dict, tensors: Dict[str, torch.Tensor]) -> None:
    dtypes = header["tensor_dtypes"]
    if set(dtypes) != set(tensors):
        raise _bad(path, "tensor_dtypes", f"lists {sorted(dtypes)} but the file holds {sorted(tensors)}")
    for name, t in tensors.items():
        if str(t.dtype) != dtypes[name]:
            raise _bad(path, f"tensor {name!r}", f"is {t.dtype} but the metadata says {dtypes[name]}")
        if header["format_version"] >= 2:
            if header["tensor_shapes"].get(name) != list(t.shape):
                raise _bad(path, f"tensor {name!r}", f"has shape {list(t.shape)} but the metadata says "
                                                     f"{header['tensor_shapes'].get(name)}")
            if header["tensor_sha256"].get(name) != tensor_sha256(t):
                raise _bad(path, f"tensor {name!r}", "does not match its checksum")


def _check_context(path: Path, c: ReferenceContext) -> None:
    from .config import IconMattingConfig
    from .context import POOLING_MODES
    from .features import seed_problem
    from .matching import max_token_magnitude

    if not isinstance(c.config, IconMattingConfig):
        raise _bad(path, "config", f"is a {type(c.config).__name__}, not a model configuration")
    tokens = c.tokens
    if tokens.dtype != torch.float32 or tokens.ndim != 2:
        raise _bad(path, "tokens", f"are {tokens.dtype} {list(tokens.shape)}, not float32 [N, C]")
    counts = c.token_counts
    if not counts or any(type(n) is not int or n < 0 for n in counts) or sum(counts) != tokens.shape[0] or not sum(counts):
        raise _bad(path, "token_counts", f"{list(counts)} do not add up to the {tokens.shape[0]} tokens stored (or are empty)")
    if tokens.shape[1] != c.config.unet_feature_channels[1]:
        raise _bad(path, "tokens", f"have {tokens.shape[1]} channels but the config says {c.config.unet_feature_channels[1]}")
    if not torch.isfinite(tokens).all():
        raise _bad(path, "tokens", "hold NaN or infinite values")
    largest, bound = float(tokens.abs().max()) if tokens.numel() else 0.0, max_token_magnitude(tokens.shape[1])
    if largest > bound:
        raise _bad(path, "tokens", f"hold values up to {largest:.3g}; the head's token normalisation overflows above "
                                   f"{bound:.3g}")
    if len(c.reference_sizes) not in (0, len(counts)) or any(
            len(hw) != 2 or any(type(v) is not int or v < 1 for v in hw) for hw in c.reference_sizes):
        raise _bad(path, "reference_sizes", f"{c.reference_sizes!r} are not one (height, width) per reference")
    if c.pooling not in POOLING_MODES:
        raise _bad(path, "pooling", f"is {c.pooling!r}, not one of {', '.join(POOLING_MODES)}")
    if c.resize_mode not in ("pad", "stretch"):
        raise _bad(path, "resize_mode", f"is {c.resize_mode!r}, not pad or stretch")
    problem = seed_problem(c.seed)
    if problem is not None:
        raise _bad(path, "seed", f"is {c.seed!r}, {problem}")


def _build(path: Path, header: dict, tensors: Dict[str, torch.Tensor]) -> ReferenceContext:
    _check_tensors(path, header, tensors)
    hints = typing.get_type_hints(ReferenceContext)
    known = {f.name: f for f in dataclasses.fields(ReferenceContext)}
    values: Dict[str, Any] = {}
    stored = list(tensors) + list(header["fields"])
    unknown = [name for name in stored if name not in known]
    if unknown:
        raise ContextFileError(
            f"{path} holds context fields this version does not know ({', '.join(unknown)}); update the pack or encode again."
        )
    for name, value in header["fields"].items():
        try:
            values[name] = _from_json(value, hints[name])
        except (TypeError, ValueError, RecursionError, AttributeError) as exc:
            raise _bad(path, f"field {name!r}", f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    values.update(tensors)
    missing = [n for n, f in known.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ContextFileError(f"{path} lacks the context fields {', '.join(missing)}; encode the reference again.")
    try:
        context = ReferenceContext(**values)
    except (TypeError, ValueError) as exc:
        raise _bad(path, "the fields", f"do not make a context ({' '.join(str(exc).split())[:200]})") from None
    _check_context(path, context)
    return context
