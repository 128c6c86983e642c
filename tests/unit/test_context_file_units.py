"""Context files without a model (a hand-made context, fingerprint strings): what is stored, what
is checked. Expected texts and values are written out here. Fast, for mutation runs too."""
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from iconmatting_core.config import IconMattingConfig
from iconmatting_core.context import ReferenceContext
from iconmatting_core.context_file import (
    METADATA_KEY,
    ContextFileError,
    fingerprint_label,
    load_context,
    read_context_metadata,
    same_weights,
    save_context,
    tensor_sha256,
)
from tiny_models import tiny_config


def _context(n=(3, 2)):
    tokens = torch.arange(sum(n) * 64, dtype=torch.float32).reshape(sum(n), 64) / 7
    return ReferenceContext(tokens, tuple(n), tiny_config(), pooling="scribble", seed=5,
                            reference_sizes=((10, 20), (30, 40)), resize_mode="stretch")


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


def test_roundtrip_and_stored_header(tmp_path):
    c = _context()
    path = save_context(tmp_path / "sub" / "c.safetensors", c, "FP", {"resize_mode": "stretch", "sd": "x.safetensors"})
    assert path == tmp_path / "sub" / "c.safetensors"
    h = _header(path)
    assert h["format_version"] == 2 and h["fingerprint"] == "FP" and h["extra"] == {"resize_mode": "stretch", "sd": "x.safetensors"}
    assert h["tensor_dtypes"] == {"tokens": "torch.float32"} and h["tensor_shapes"] == {"tokens": [5, 64]}
    expected_sum = hashlib.sha256(np.ascontiguousarray(c.tokens.numpy()).tobytes()).hexdigest()  # independent of the code
    assert h["tensor_sha256"] == {"tokens": expected_sum} and tensor_sha256(c.tokens) == expected_sum
    assert h["fields"] == {"token_counts": [3, 2], "config": tiny_config().to_dict() | {
        k: list(v) for k, v in tiny_config().to_dict().items() if isinstance(v, tuple)},
        "pooling": "scribble", "seed": 5, "reference_sizes": [[10, 20], [30, 40]], "resize_mode": "stretch"}
    loaded = load_context(path, expected_fingerprint="FP")
    assert torch.equal(loaded.tokens, c.tokens) and loaded.token_counts == (3, 2) and loaded.config == tiny_config()
    assert loaded.reference_sizes == ((10, 20), (30, 40)) and type(loaded.reference_sizes[0]) is tuple
    assert (loaded.pooling, loaded.seed, loaded.resize_mode) == ("scribble", 5, "stretch")
    assert read_context_metadata(path)["extra"]["sd"] == "x.safetensors"
    h2 = _header(save_context(tmp_path / "d.safetensors", c, "FP"))
    assert h2["extra"] == {}
    with pytest.raises(TypeError, match="context must be a ReferenceContext, got dict"):
        save_context(tmp_path / "e.safetensors", {}, "FP")


def _rewrite(tmp_path, name, edit=None, tokens=None, raw=None):
    path = save_context(tmp_path / "good.safetensors", _context(), "FP", {"resize_mode": "pad"})
    h = _header(path)
    if edit:
        edit(h)
    t = _context().tokens if tokens is None else tokens
    out = tmp_path / f"{name}.safetensors"
    save_file({"tokens": t}, str(out), metadata={METADATA_KEY: raw if raw is not None else json.dumps(h)})
    return out


@pytest.mark.parametrize("name, edit, tokens, raw, message", [
    ("newer", lambda h: h.update(format_version=3), None, None,
     "has context format version 3; this version of iconmatting_core reads up to 2"),
    ("zero", lambda h: h.update(format_version=0), None, None, "format_version is 0, not a format number"),
    ("boolv", lambda h: h.update(format_version=True), None, None, "format_version is True, not a format number"),
    ("noversion", lambda h: h.pop("format_version"), None, None, "format_version is None, not a format number"),
    ("unknown", lambda h: h["fields"].update(colour=1), None, None, "holds context fields this version does not know (colour)"),
    ("missing", lambda h: h["fields"].pop("config"), None, None, "lacks the context fields config"),
    ("badfp", lambda h: h.update(fingerprint=None), None, None, "fingerprint is a NoneType, not a str"),
    ("extra", lambda h: h.update(extra=[1]), None, None, "extra is a list, not a dict"),
    ("sdname", lambda h: h["extra"].update(sd=5), None, None, "extra.sd is 5, not text"),
    ("mode", lambda h: h["extra"].update(resize_mode="crop"), None, None, "extra.resize_mode is 'crop', not pad or stretch"),
    ("dtypes", lambda h: h.update(tensor_dtypes={}), None, None, "tensor_dtypes lists [] but the file holds ['tokens']"),
    ("dtype", lambda h: h["tensor_dtypes"].update(tokens="torch.float16"), None, None,
     "tensor 'tokens' is torch.float32 but the metadata says torch.float16"),
    ("shape", lambda h: h["tensor_shapes"].update(tokens=[64, 5]), None, None, "has shape [5, 64] but the metadata says [64, 5]"),
    ("sum", lambda h: h["tensor_sha256"].update(tokens="0" * 64), None, None, "tensor 'tokens' does not match its checksum"),
    ("counts", lambda h: h["fields"].update(token_counts=[3, 3]), None, None, "token_counts [3, 3] do not add up to the 5 tokens"),
    ("negcount", lambda h: h["fields"].update(token_counts=[6, -1]), None, None, "token_counts [6, -1] do not add up"),
    ("nocounts", lambda h: h["fields"].update(token_counts=[]), None, None, "token_counts [] do not add up"),
    ("sizes", lambda h: h["fields"].update(reference_sizes=[[10, 20]]), None, None, "reference_sizes ((10, 20),) are not one"),
    ("size0", lambda h: h["fields"].update(reference_sizes=[[10, 20], [0, 4]]), None, None, "reference_sizes"),
    ("pool", lambda h: h["fields"].update(pooling="max"), None, None, "pooling is 'max', not one of mask, scribble"),
    ("mode2", lambda h: h["fields"].update(resize_mode="crop"), None, None, "resize_mode is 'crop', not pad or stretch"),
    ("seed", lambda h: h["fields"].update(seed=1.5), None, None, "seed is 1.5, not a whole number"),
    ("config", lambda h: h["fields"]["config"].update(image_size=100), None, None, "field 'config' cannot be read"),
    ("channels", lambda h: h["fields"]["config"].update(unet_feature_channels=[64, 32]), None, None,
     "tokens have 64 channels but the config says 32"),
    ("list", None, None, "[1]", "the metadata is a JSON list, not an object"),
    ("deep", None, None, "[" * 50_000 + "]" * 50_000, "the metadata is not valid JSON (RecursionError)"),
    ("big", None, None, json.dumps({"x": "y" * 1_000_001}), "the metadata is 1000010 bytes (at most 1000000)"),
])
def test_bad_files(tmp_path, name, edit, tokens, raw, message):
    path = _rewrite(tmp_path, name, edit, tokens, raw)
    with pytest.raises(ContextFileError) as err:
        load_context(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_tokens_checks(tmp_path):
    def fix(t):
        return lambda h: (h["tensor_dtypes"].update(tokens=str(t.dtype)), h["tensor_shapes"].update(tokens=list(t.shape)),
                          h["tensor_sha256"].update(tokens=tensor_sha256(t)))

    for name, t, message in (("int", _context().tokens.long(), "tokens are torch.int64 [5, 64], not float32 [N, C]"),
                             ("nan", _context().tokens.clone().fill_(float("inf")), "tokens hold NaN or infinite values"),
                             ("flat", _context().tokens.reshape(-1), "tokens are torch.float32 [320], not float32")):
        with pytest.raises(ContextFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_context(_rewrite(tmp_path, name, fix(t), t))


def test_not_found_and_not_context(tmp_path):
    with pytest.raises(ContextFileError, match=f"context file not found: {tmp_path / 'no.safetensors'}. Make one with"):
        load_context(tmp_path / "no.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ContextFileError, match="is not an IconMatting context file"):
        load_context(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ContextFileError, match="cannot read context file"):
        load_context(tmp_path / "junk.safetensors")


def test_other_weights_message(tmp_path):
    path = save_context(tmp_path / "c.safetensors", _context(), "FP", {"matting_weights": "icm.ckpt", "sd": "v2.safetensors"})
    with pytest.raises(ContextFileError) as err:
        load_context(path, expected_fingerprint="OTHER")
    msg = str(err.value)
    assert f"(fingerprint {fingerprint_label('FP')}: matting_weights icm.ckpt, sd v2.safetensors)" in msg
    assert f"loaded now (fingerprint {fingerprint_label('OTHER')})" in msg
    assert fingerprint_label("FP") == hashlib.sha256(b"FP").hexdigest()[:12]


def test_same_weights_tolerance():
    def fp(values, structure="abc"):
        return f"sig1:{structure}:" + np.array(values, np.float16).tobytes().hex()

    base = fp([1.0, -2.0, 0.5])
    assert same_weights(base, fp([1.0, -2.0, 0.5]))
    assert same_weights(base, fp([1.0 * 1.007, -2.0, 0.5]))  # bf16 rounding
    assert not same_weights(base, fp([1.02, -2.0, 0.5]))
    assert not same_weights(base, fp([1.0, -2.0, 0.5], "abd"))
    assert not same_weights(base, "sig2" + base[4:])
    assert not same_weights(base, fp([1.0, -2.0]))
    assert same_weights("x", "x") and not same_weights("x", "y") and not same_weights(None, base)
    assert not same_weights(base, None)


def test_config_roundtrip_is_exact():
    cfg = IconMattingConfig()
    assert IconMattingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
