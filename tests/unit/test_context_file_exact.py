"""Context files, exactly: the fingerprint against a formula written here, the user-facing messages
word for word (one line naming the file and the field), and the edges of each check (format 1,
header size, a count of 0, a 1x1 reference). No model; fast, for mutation runs too."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from iconmatting_core.config import IconMattingConfig
from iconmatting_core.context import ReferenceContext
from iconmatting_core.context_file import ContextFileError, load_context, model_fingerprint, read_context_metadata, \
    save_context, tensor_sha256
from tiny_models import tiny_config

KEY = "iconmatting_context"  # the metadata key, written out
TAIL = "; the file is damaged or was not written by `encode`. Encode the reference again."


def _context(n=(3, 2), sizes=((10, 20), (30, 40)), mode="stretch"):
    tokens = torch.arange(sum(n) * 64, dtype=torch.float32).reshape(sum(n), 64) / 7
    return ReferenceContext(tokens, tuple(n), tiny_config(), pooling="scribble", seed=5, reference_sizes=sizes,
                            resize_mode=mode)


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[KEY])


def _rewrite(tmp_path, name, edit=None, raw=None, context=None):
    c = context or _context()
    h = _header(save_context(tmp_path / "good.safetensors", c, "FP"))
    if edit:
        edit(h)
    out = tmp_path / f"{name}.safetensors"
    save_file({"tokens": c.tokens}, str(out), metadata={KEY: raw if raw is not None else json.dumps(h)})
    return out


def _message(path):
    with pytest.raises(ContextFileError) as err:
        load_context(path)
    return str(err.value)


# --- fingerprint -----------------------------------------------------------------------------------

class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(10, dtype=torch.float32) - 4.5)
        self.big = torch.nn.Parameter(torch.arange(200, dtype=torch.float32).reshape(20, 10) * 0.5)
        self.register_buffer("steps", torch.arange(3))  # integer: not part of the fingerprint


class _Extractor:
    def fingerprint_tensors(self):
        return {"unet.conv_in.weight": torch.tensor([[1.0, -2.0], [3.0, 0.25], [7.0, 8.0]])}


def test_fingerprint_is_the_documented_formula():
    head, ext = _Head(), _Extractor()
    names = [("head.big", (20, 10), head.big.detach().numpy().reshape(-1)),
             ("head.w", (10,), head.w.detach().numpy()),
             ("sd.unet.conv_in.weight", (3, 2), ext.fingerprint_tensors()["unet.conv_in.weight"].numpy().reshape(-1))]
    structure = hashlib.sha256("".join(f"{n}:{s}\n" for n, s, _ in names).encode()).hexdigest()[:16]
    samples = []
    for _, _, flat in names:
        index = np.round(np.linspace(0, flat.size - 1, min(64, flat.size))).astype(int)  # 64 evenly spaced values
        samples.append(flat[index])
    sample = np.concatenate(samples).astype(np.float16).tobytes().hex()
    assert len(sample) == (64 + 10 + 6) * 4
    assert model_fingerprint(head, ext) == f"sig1:{structure}:{sample}"


# --- what is written -------------------------------------------------------------------------------

def test_file_mode_nested_folders_and_metadata_key(tmp_path):
    path = save_context(tmp_path / "a" / "b" / "c.safetensors", _context(), "FP")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert _header(path)["fingerprint"] == "FP"


def test_empty_tensor_checksum_is_sha256_of_nothing():
    assert tensor_sha256(torch.zeros(0)) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_unstorable_values_are_named(tmp_path):
    with pytest.raises(TypeError) as err:
        save_context(tmp_path / "x.safetensors", _context(), "FP", {"when": object()})
    assert str(err.value) == "ReferenceContext field 'extra_metadata' holds a object, which a context file cannot store"
    with pytest.raises(TypeError) as err:
        save_context(tmp_path / "x.safetensors", {}, "FP")
    assert str(err.value) == "context must be a ReferenceContext, got dict"


# --- what is accepted at the edges -----------------------------------------------------------------

def test_pad_context_round_trips(tmp_path):
    c = _context(mode="pad")
    assert load_context(save_context(tmp_path / "p.safetensors", c, "FP")).resize_mode == "pad"


def test_a_reference_of_1x1_and_a_reference_with_0_tokens_load(tmp_path):
    c = load_context(save_context(tmp_path / "z.safetensors", _context(n=(5, 0), sizes=((1, 1), (2, 3))), "FP"))
    assert c.token_counts == (5, 0) and c.reference_sizes == ((1, 1), (2, 3))


def test_format_1_without_checksums_loads_and_format_2_needs_them(tmp_path):
    def v1(h):
        h.update(format_version=1)
        del h["tensor_shapes"], h["tensor_sha256"]

    p1 = _rewrite(tmp_path, "v1", v1)
    assert load_context(p1, trust_unverified=True).token_counts == (3, 2)
    with pytest.raises(ContextFileError, match="is a context file of format 1, which carries no checksums"):
        load_context(p1)  # unverifiable: only when trusted explicitly
    p = _rewrite(tmp_path, "noshapes", lambda h: h.pop("tensor_shapes"))
    assert _message(p) == f"{p}: tensor_shapes is missing, not a dict{TAIL}"


def test_missing_extra_reads_as_empty(tmp_path):
    p = _rewrite(tmp_path, "noextra", lambda h: h.pop("extra"))
    assert read_context_metadata(p)["extra"] == {}
    assert load_context(p).token_counts == (3, 2)


def test_header_of_exactly_the_limit_is_read(tmp_path):
    text = json.dumps({"x": "y" * (1_000_000 - 9)})
    assert len(text) == 1_000_000
    p = _rewrite(tmp_path, "limit", raw=text)
    assert _message(p) == f"{p}: format_version is None, not a format number{TAIL}"


# --- messages, word for word -----------------------------------------------------------------------

def test_messages_name_the_file_and_the_field(tmp_path):
    nf = tmp_path / "no.safetensors"
    assert _message(nf) == f"context file not found: {nf}. Make one with `python -m iconmatting_core encode ... --out {nf}`."
    other = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    assert _message(other) == f"{other} is not an IconMatting context file (no 'iconmatting_context' metadata); make one with `encode`."
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    msg = _message(junk)
    assert msg.startswith(f"cannot read context file {junk}: ") and msg.endswith(". Is it a context file written by `encode`?")

    cases = [
        ("zero", lambda h: h.update(format_version=0), "format_version is 0, not a format number"),
        ("nofp", lambda h: h.pop("fingerprint"), "fingerprint is missing, not a str"),
        ("xmode", lambda h: h["extra"].update(resize_mode=5), "extra.resize_mode is 5, not text"),
        ("xweights", lambda h: h["extra"].update(matting_weights=5), "extra.matting_weights is 5, not text"),
        ("xsd", lambda h: h["extra"].update(sd=5), "extra.sd is 5, not text"),
        ("shape", lambda h: h["tensor_shapes"].update(tokens=[64, 5]),
         "tensor 'tokens' has shape [5, 64] but the metadata says [64, 5]"),
        ("pool", lambda h: h["fields"].update(pooling=["mask"]), "pooling is ['mask'], not one of mask, scribble"),
        ("mode", lambda h: h["fields"].update(resize_mode="crop"), "resize_mode is 'crop', not pad or stretch"),
        ("counts0", lambda h: h["fields"].update(token_counts=[0, 0]),
         "token_counts [0, 0] do not add up to the 5 tokens stored (or are empty)"),
    ]
    for name, edit, field_problem in cases:
        p = _rewrite(tmp_path, name, edit)
        assert _message(p) == f"{p}: {field_problem}{TAIL}", name

    p = _rewrite(tmp_path, "newer", lambda h: h.update(format_version=3))
    assert _message(p) == (f"{p} has context format version 3; this version of iconmatting_core reads up to 2. "
                           "Update the pack, or encode the reference again.")
    p = _rewrite(tmp_path, "unknown", lambda h: h["fields"].update(colour=1, size=2))
    assert _message(p) == f"{p} holds context fields this version does not know (colour, size); update the pack or encode again."
    p = _rewrite(tmp_path, "missing", lambda h: (h["fields"].pop("config"), h["fields"].pop("token_counts")))
    assert _message(p) == f"{p} lacks the context fields token_counts, config; encode the reference again."


def test_unreadable_field_quotes_the_error_on_one_line_cut_at_200(tmp_path):
    bad = dict(tiny_config().to_dict(), **{"a_very_long_unknown_setting_" + "z" * 300: 1})
    with pytest.raises((TypeError, ValueError)) as exc:  # the error the configuration itself gives (not the code under test)
        IconMattingConfig.from_dict(bad)
    detail = " ".join(str(exc.value).split())
    assert len(detail) > 200 and " " in detail
    p = _rewrite(tmp_path, "cfg", lambda h: h["fields"].update(config=bad))
    assert _message(p) == f"{p}: field 'config' cannot be read ({exc.type.__name__}: {detail[:200]}){TAIL}"


def test_other_weights_message_word_for_word(tmp_path):
    def label(fp):
        return hashlib.sha256(fp.encode()).hexdigest()[:12]

    p = save_context(tmp_path / "c.safetensors", _context(), "FP", {"matting_weights": "icm.ckpt", "sd": "v2.safetensors"})
    with pytest.raises(ContextFileError) as err:
        load_context(p, expected_fingerprint="OTHER")
    assert str(err.value) == (
        f"{p} was encoded with other model weights (fingerprint {label('FP')}: matting_weights icm.ckpt, sd v2.safetensors) "
        f"than the ones loaded now (fingerprint {label('OTHER')}). Load the IconMatting and Stable Diffusion 2.1 weights "
        "it was made with, or encode the reference again with these weights.")
    q = save_context(tmp_path / "d.safetensors", _context(), "FP")
    with pytest.raises(ContextFileError) as err:
        load_context(q, expected_fingerprint="OTHER")
    assert f"(fingerprint {label('FP')}) than the ones loaded now" in str(err.value)


def test_dataclasses_in_extra_metadata_are_stored_by_their_to_dict(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Note:
        text: str

        def to_dict(self):
            return {"note": self.text.upper()}

    p = save_context(tmp_path / "n.safetensors", _context(), "FP", {"n": Note("hi"), "plain": [tiny_config().image_size]})
    assert read_context_metadata(p)["extra"] == {"n": {"note": "HI"}, "plain": [128]}


def test_same_weights_absolute_tolerance_is_1e6_near_zero():
    from iconmatting_core.context_file import same_weights

    def fp(values):
        return "sig1:abc:" + np.array(values, np.float16).tobytes().hex()

    assert same_weights(fp([0.0, 1.0]), fp([0.9e-6, 1.0]))
    assert not same_weights(fp([0.0, 1.0]), fp([1.6e-6, 1.0]))  # float16 holds 1.6e-6 as ~1.61e-6
