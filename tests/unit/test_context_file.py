"""Reference contexts saved to and loaded from files (context_file, `encode`, `matte --context`)."""
import dataclasses
import os
import stat

import pytest
import torch

from iconmatting_core.__main__ import main
from iconmatting_core.context_file import (
    ContextFileError,
    fingerprint_label,
    load_context,
    model_fingerprint,
    read_context_metadata,
    same_weights,
    save_context,
)
from iconmatting_core.pipeline import IconMattingModel, IconMattingPipeline
from sample_inputs import make_reference, make_targets, save_reference_and_targets
from tiny_models import tiny_head


def test_saved_context_equals_recomputed_bit_for_bit(pipe, tmp_path):
    image, mask = make_reference()
    context = pipe.encode_reference(image, mask, pooling="scribble", resize_mode="stretch", seed=3)
    path = save_context(tmp_path / "ref.safetensors", context, pipe.fingerprint, {"resize_mode": "stretch"})
    loaded = load_context(path, expected_fingerprint=pipe.fingerprint)
    for f in dataclasses.fields(context):  # every field, whatever fields the dataclass has
        a, b = getattr(context, f.name), getattr(loaded, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b and type(a) is type(b), f.name
    targets = make_targets(2)
    recomputed = pipe.matte(pipe.encode_reference(image, mask, pooling="scribble", resize_mode="stretch", seed=3), targets)
    reused = pipe.matte(loaded, targets)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, reused))
    meta = read_context_metadata(path)
    assert meta["extra"] == {"resize_mode": "stretch"} and meta["fingerprint"] == pipe.fingerprint
    assert meta["fields"]["token_counts"] == list(context.token_counts)


def test_fingerprint_covers_head_and_sd_weights(pipe):
    head, extractor = pipe.model.head, pipe.model.extractor
    base = model_fingerprint(head, extractor)
    assert base == pipe.fingerprint and same_weights(base, pipe.fingerprint)

    other_head = tiny_head(head.config, seed=0)
    assert model_fingerprint(other_head, extractor) == base  # same weights, another object
    assert not same_weights(model_fingerprint(tiny_head(head.config, seed=1), extractor), base)  # another head
    tuned = tiny_head(head.config, seed=0)
    with torch.no_grad():  # a fine-tune: every weight moved by about 1%
        for p in tuned.parameters():
            p.mul_(1 + 0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)).sign())
    assert not same_weights(model_fingerprint(tuned, extractor), base)

    class OtherSD:  # a host's extractor returning the three tensors, one changed
        def fingerprint_tensors(self):
            tensors = {k: v.clone() for k, v in extractor.fingerprint_tensors().items()}
            tensors["unet.conv_in.weight"] = torch.randn_like(tensors["unet.conv_in.weight"])
            return tensors

    assert {"unet.conv_in.weight", "vae.encoder.conv_in.weight"} <= set(extractor.fingerprint_tensors())
    assert not same_weights(model_fingerprint(head, OtherSD()), base)


def test_fingerprint_is_the_same_in_any_precision(pipe):
    """A context made on a GPU in fp16 (e.g. in ComfyUI) loads in an fp32 command-line run of the same files."""
    import copy

    head, extractor = pipe.model.head, pipe.model.extractor

    class HalfSD:
        def fingerprint_tensors(self):
            return {k: v.half() for k, v in extractor.fingerprint_tensors().items()}

    class BF16SD:  # e.g. ComfyUI's VAE in bf16 on a recent GPU
        def fingerprint_tensors(self):
            return {k: v.bfloat16() for k, v in extractor.fingerprint_tensors().items()}

    base = model_fingerprint(head, extractor)
    assert same_weights(model_fingerprint(copy.deepcopy(head).half(), HalfSD()), base)
    assert same_weights(model_fingerprint(copy.deepcopy(head).bfloat16(), BF16SD()), base)


def test_context_from_other_weights_is_refused_clearly(pipe, tmp_path):
    image, mask = make_reference()
    path = save_context(tmp_path / "ref.safetensors", pipe.encode_reference(image, mask), pipe.fingerprint,
                        {"matting_weights": "icm.safetensors", "sd": "v2-1_768-ema-pruned.safetensors"})
    other = IconMattingPipeline(IconMattingModel(pipe.model.extractor, tiny_head(pipe.config, seed=7)))
    with pytest.raises(ContextFileError) as err:
        load_context(path, expected_fingerprint=other.fingerprint)
    msg = str(err.value)
    assert str(path) in msg and fingerprint_label(pipe.fingerprint) in msg and fingerprint_label(other.fingerprint) in msg
    assert "icm.safetensors" in msg and "encode the reference again" in msg


def test_not_a_context_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ContextFileError, match="not an IconMatting context file"):
        load_context(tmp_path / "weights.safetensors")
    with pytest.raises(ContextFileError, match="not found"):
        load_context(tmp_path / "missing.safetensors")


def test_encode_then_matte_with_context_equals_matte_with_reference(pipe, tmp_path):
    targets = save_reference_and_targets(tmp_path)
    ref = ["--reference", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png")]
    ctx = tmp_path / "ref_context.safetensors"
    assert main(["encode", *ref, "--resize-mode", "stretch", "--out", str(ctx)], pipe_factory=lambda: pipe) == 0
    assert stat.S_IMODE(ctx.stat().st_mode) == 0o666 & ~_umask()
    assert main(["matte", "--context", str(ctx), "--targets", str(targets), "--out", str(tmp_path / "a")],
                pipe_factory=lambda: pipe) == 0
    # the resize mode stored at encode time is used: same as matting with --resize-mode stretch
    assert main(["matte", *ref, "--resize-mode", "stretch", "--targets", str(targets), "--out", str(tmp_path / "b")],
                pipe_factory=lambda: pipe) == 0
    assert main(["matte", *ref, "--targets", str(targets), "--out", str(tmp_path / "c")], pipe_factory=lambda: pipe) == 0
    for t in sorted(targets.iterdir()):
        a, b, c = ((tmp_path / d / f"{t.stem}_alpha.png").read_bytes() for d in "abc")
        assert a == b and a != c


def test_matte_refuses_a_context_of_other_weights(pipe, tmp_path, capsys):
    targets = save_reference_and_targets(tmp_path)
    image, mask = make_reference()
    ctx = save_context(tmp_path / "ctx.safetensors", pipe.encode_reference(image, mask), "0" * 64)
    code = main(["matte", "--context", str(ctx), "--targets", str(targets), "--out", str(tmp_path / "out")],
                pipe_factory=lambda: pipe)
    assert code == 2
    assert "encoded with other model weights" in capsys.readouterr().err
    assert main(["matte", "--context", str(ctx), "--reference", str(tmp_path / "ref.png"), "--targets", str(targets),
                 "--out", str(tmp_path / "out")], pipe_factory=lambda: pipe) == 2
    assert "either --context" in capsys.readouterr().err


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old
