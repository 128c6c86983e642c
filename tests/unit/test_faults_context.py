"""Tampered context files: each is refused up front (exit 2, one line naming the file and the
field), before any target is matted."""
import json

import pytest
import torch
from safetensors.torch import save_file

from iconmatting_core.__main__ import main
from iconmatting_core.context_file import METADATA_KEY, ContextFileError, load_context, save_context
from sample_inputs import make_reference, save_reference_and_targets


@pytest.fixture(scope="module")
def good(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("ctx")
    image, mask = make_reference()
    path = save_context(d / "good.safetensors", pipe.encode_reference(image, mask), pipe.fingerprint,
                        {"resize_mode": "pad", "matting_weights": "icm.safetensors", "sd": "v2-1_768-ema-pruned.safetensors"})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[METADATA_KEY])
        tokens = f.get_tensor("tokens")
    return path, header, tokens


def _write(path, header, tokens):
    save_file({"tokens": tokens}, str(path), metadata={METADATA_KEY: header if isinstance(header, str) else json.dumps(header)})
    return path


def _edit(header, dotted, value):
    h = json.loads(json.dumps(header))
    node = h
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is _DROP:
        del node[last]
    else:
        node[last] = value
    return h


_DROP = object()


def _cases(header, tokens):
    deep = "[" * 100_000 + "]" * 100_000
    n = tokens.shape[0]
    return [
        ("flipped", header, None, "tensor 'tokens' does not match its checksum"),
        ("int64", _edit(header, "tensor_dtypes.tokens", "torch.int64"), tokens.long(), "tensor 'tokens' does not match its checksum"),
        ("nan", header, torch.full_like(tokens, float("nan")), "tensor 'tokens' does not match its checksum"),
        ("list", [1, 2], tokens, "the metadata is a JSON list, not an object"),
        ("deep", deep, tokens, "the metadata is not valid JSON (RecursionError)"),
        ("notjson", "{oops", tokens, "the metadata is not valid JSON"),
        ("config_null", _edit(header, "fields.config", None), tokens, "field 'config' cannot be read"),
        ("config_list", _edit(header, "fields.config", [1]), tokens, "field 'config' cannot be read"),
        ("fingerprint_int", _edit(header, "fingerprint", 7), tokens, "fingerprint is a int, not a str"),
        ("version_str", _edit(header, "format_version", "2"), tokens, "format_version is '2', not a format number"),
        ("version_missing", _edit(header, "format_version", _DROP), tokens, "format_version is None, not a format number"),
        ("version_newer", _edit(header, "format_version", 99), tokens,
         "has context format version 99; this version of iconmatting_core reads up to 2"),
        ("resize_mode", _edit(header, "extra.resize_mode", "crop"), tokens, "extra.resize_mode is 'crop', not pad or stretch"),
        ("resize_field", _edit(header, "fields.resize_mode", "crop"), tokens, "resize_mode is 'crop', not pad or stretch"),
        ("seed", _edit(header, "fields.seed", "zero"), tokens, "seed is 'zero', not a whole number"),
        ("pooling", _edit(header, "fields.pooling", "max"), tokens, "pooling is 'max', not one of mask, scribble"),
        ("counts", _edit(header, "fields.token_counts", [n + 1]), tokens, f"token_counts [{n + 1}] do not add up to the {n} tokens"),
        ("unknown", _edit(header, "fields.colour", 1), tokens, "holds context fields this version does not know (colour)"),
        ("missing", _edit(header, "fields.token_counts", _DROP), tokens, "lacks the context fields token_counts"),
        ("fields_null", _edit(header, "fields", None), tokens, "fields is a NoneType, not a dict"),
        ("shape", _edit(header, "tensor_shapes.tokens", [n, 1]), tokens, "has shape"),
        ("no_sums", _edit(header, "tensor_sha256", _DROP), tokens, "tensor_sha256 is missing, not a dict"),
        ("sizes", _edit(header, "fields.reference_sizes", [[0, 5]]), tokens, "reference_sizes"),
    ]


def test_tampered_context_files_are_refused_up_front(good, pipe, tmp_path, capsys):
    path, header, tokens = good
    targets = save_reference_and_targets(tmp_path, 1)
    from iconmatting_core.context_file import tensor_sha256

    cases = _cases(header, tokens)
    assert len(cases) >= 20
    problems = []
    for name, h, t, expected in cases:
        bad = tmp_path / f"{name}.safetensors"
        if name == "flipped":
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x40  # one bit in the tensor data
            bad.write_bytes(bytes(data))
        else:
            if t is not None and name not in ("int64", "nan") and isinstance(h, dict) and "tensor_sha256" in h:
                h = _edit(h, "tensor_sha256.tokens", tensor_sha256(t))
            _write(bad, h, t)
        out = tmp_path / f"out_{name}"
        code = main(["matte", "--context", str(bad), "--targets", str(targets), "--out", str(out)], pipe_factory=lambda: pipe)
        err = capsys.readouterr().err
        if code != 2 or err.count("\n") != 1 or str(bad) not in err or expected not in err or "Traceback" in err \
                or list(out.glob("*.png")):
            problems.append(f"{name}: {code} {err!r} (expected {expected!r})")
    assert not problems, "\n".join(problems)


def test_consistent_but_wrong_tokens_are_caught_by_their_checks(good, tmp_path):
    """int64, NaN and 0-row tokens written with matching checksums (a buggy writer, not a flipped bit)."""
    from iconmatting_core.context_file import tensor_sha256

    path, header, tokens = good
    cases = [("int64", tokens.long(), "tokens are torch.int64"), ("nan", tokens.clone().fill_(float("nan")), "tokens hold NaN"),
             ("empty", tokens[:0].clone(), "token_counts")]
    for name, t, expected in cases:
        h = _edit(_edit(_edit(header, "tensor_dtypes.tokens", str(t.dtype)), "tensor_shapes.tokens", list(t.shape)),
                  "tensor_sha256.tokens", tensor_sha256(t))
        with pytest.raises(ContextFileError, match=expected):
            load_context(_write(tmp_path / f"{name}.safetensors", h, t))


def test_a_version_1_file_without_checksums_loads_when_trusted(good, tmp_path, pipe):
    path, header, tokens = good
    old = {k: v for k, v in header.items() if k not in ("tensor_shapes", "tensor_sha256")}
    old["format_version"] = 1
    loaded = load_context(_write(tmp_path / "v1.safetensors", old, tokens), expected_fingerprint=pipe.fingerprint,
                          trust_unverified=True)
    assert torch.equal(loaded.tokens, tokens)


def test_wrong_weights_message_names_both_weight_files(good, pipe):
    from iconmatting_core.pipeline import IconMattingModel, IconMattingPipeline
    from tiny_models import tiny_head

    other = IconMattingPipeline(IconMattingModel(pipe.model.extractor, tiny_head(pipe.config, seed=7)))
    with pytest.raises(ContextFileError) as err:
        load_context(good[0], expected_fingerprint=other.fingerprint)
    assert "matting_weights icm.safetensors, sd v2-1_768-ema-pruned.safetensors" in str(err.value)


def test_resize_mode_on_the_command_line_wins_over_the_context_files(good):
    """The file stores "pad": --resize-mode stretch mattes stretched; without the option, the file's "pad"."""
    import argparse

    from iconmatting_core.job.matte import Reference

    args = argparse.Namespace(context=str(good[0]), trust_unverified_context=False, no_foreground=False, dtype="auto")
    assert Reference(argparse.Namespace(**vars(args), resize_mode="stretch")).resize_mode == "stretch"
    assert Reference(argparse.Namespace(**vars(args), resize_mode=None)).resize_mode == "pad"
