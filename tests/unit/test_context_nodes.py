"""Nodes 2 (Encode Reference, Save Context, Load Context) in pieces, fast: over a stand-in ICONMATTING_MODEL
(a small head, two SD tensors to fingerprint, a pipeline that records what it is asked) and a context
written by hand. tests/unit/test_nodes.py runs the same nodes over the tiny diffusers model."""
import os
import types

import pytest
import torch

from iconmatting_core.context_file import model_fingerprint

ENCODE, SAVE = "IconMatting 2 · Encode Reference", "IconMatting 2 · Save Context"
MAKE_ONE = f"Encode the reference with {ENCODE} and save it with {SAVE}."


def stand_in_model(seed=0):
    """An ICONMATTING_MODEL as the context nodes use it: ``model.fingerprint()`` (of ``model.head`` and ``extractor``),
    ``pipeline()`` (``encode_reference`` records its arguments in ``.encoded`` and returns "context")."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.rand(2, 3, generator=g))
        head.bias.copy_(torch.rand(2, generator=g))
    sd = {"unet.conv_in.weight": torch.rand(4, 4, generator=g), "vae.encoder.conv_in.weight": torch.rand(4, 3, generator=g)}
    encoded = []

    def encode_reference(images, masks, **options):
        encoded.append((images, masks, options))
        return "context"

    pipe = types.SimpleNamespace(encode_reference=encode_reference)
    extractor = types.SimpleNamespace(fingerprint_tensors=lambda: sd)
    model = types.SimpleNamespace(head=head, fingerprint=lambda: model_fingerprint(head, extractor))
    return types.SimpleNamespace(model=model, extractor=extractor, pipeline=lambda features=True: pipe, encoded=encoded)


def hand_made_context(pack):
    config = pack.core.context.IconMattingConfig(unet_feature_channels=(8, 8))
    return pack.core.context.ReferenceContext(
        tokens=torch.arange(40, dtype=torch.float32).reshape(5, 8), token_counts=(2, 3), config=config, pooling="scribble",
        seed=7, reference_sizes=((4, 6), (5, 3)), resize_mode="stretch")


# --- Encode Reference -------------------------------------------------------------------------------------
def test_encode_gives_each_image_with_its_mask_and_the_options_to_the_pipeline(pack):
    model = stand_in_model()
    image, mask = torch.rand(2, 6, 5, 3), torch.rand(2, 6, 5)
    out = pack.context_nodes.IconMattingEncodeReference.execute(model, image, mask, "scribble", "stretch", 11)
    assert out.result == ("context",)
    [(images, masks, options)] = model.encoded
    assert len(images) == len(masks) == 2
    assert all(torch.equal(a, b) for a, b in zip(images + masks, [image[0], image[1], mask[0], mask[1]]))
    assert options == {"pooling": "scribble", "resize_mode": "stretch", "seed": 11}


def test_encode_takes_one_mask_without_batch_and_defaults_to_pad_and_seed_0(pack):
    model = stand_in_model()
    image, mask = torch.rand(1, 6, 5, 3), torch.rand(6, 5)
    pack.context_nodes.IconMattingEncodeReference.execute(model, image, mask, "mask")
    [(images, masks, options)] = model.encoded
    assert len(masks) == 1 and torch.equal(masks[0], mask) and torch.equal(images[0], image[0])
    assert options == {"pooling": "mask", "resize_mode": "pad", "seed": 0}


def test_encode_refuses_only_the_empty_placeholder_mask_of_an_image_of_another_size(pack):
    node = pack.context_nodes.IconMattingEncodeReference
    model = stand_in_model()
    with pytest.raises(ValueError) as info:
        node.execute(model, torch.rand(1, 96, 128, 3), torch.zeros(1, 64, 64), "mask")
    assert str(info.value) == ("The reference has no mask painted (Load Image gives an empty 64x64 mask). Right-click the "
                               "reference's Load Image node, choose 'Open in MaskEditor' and paint the foreground.")
    node.execute(model, torch.rand(1, 64, 64, 3), torch.zeros(1, 64, 64), "mask")  # a 64x64 image: its mask is what it is
    painted = torch.zeros(1, 64, 64)
    painted[0, 10, 10] = 1
    node.execute(model, torch.rand(1, 96, 128, 3), painted, "mask")
    assert len(model.encoded) == 2


def test_encode_refuses_unknown_combo_values_in_so_many_words(pack):
    node = pack.context_nodes.IconMattingEncodeReference  # the host checks prompts (Choice); execute, direct calls
    with pytest.raises(ValueError) as info:
        node.execute(stand_in_model(), torch.rand(1, 6, 5, 3), torch.rand(1, 6, 5), "mask", "crop")
    assert str(info.value) == "resize_mode must be one of pad, stretch; got 'crop'."


# --- file names -------------------------------------------------------------------------------------------
def test_context_names_are_stems_in_the_folder_numbered_when_taken(pack, tmp_path):
    name = pack.context_nodes.free_context_name
    assert name(str(tmp_path), "") == "reference_context.safetensors"
    assert name(str(tmp_path), " \t") == "reference_context.safetensors"
    assert name(str(tmp_path), ".safetensors") == "reference_context.safetensors"
    assert name(str(tmp_path), "  my ref  ") == "my ref.safetensors"
    assert name(str(tmp_path), "sub/dir/ref.safetensors") == "sub/dir/ref.safetensors"  # kept inside the folder
    assert name(str(tmp_path), "ref.safetensors.safetensors") == "ref.safetensors.safetensors"
    for taken in ("ref.safetensors", "ref_00001.safetensors", "ref_00002.safetensors"):
        (tmp_path / taken).write_bytes(b"")
    assert name(str(tmp_path), "ref") == "ref_00003.safetensors"
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.safetensors")  # a dangling link is taken too
    assert name(str(tmp_path), "dangling") == "dangling_00001.safetensors"


# --- Save Context, Load Context ---------------------------------------------------------------------------
def test_saved_context_keeps_its_resize_mode_and_model_and_loads_back(pack, context_dir):
    model, ctx = stand_in_model(), hand_made_context(pack)
    out = pack.context_nodes.IconMattingSaveContext.execute(model, ctx, "ref")  # the folder does not exist yet
    assert out.ui == {"text": ["Saved ref.safetensors"]} and out.result is None
    assert pack.context_nodes.IconMattingSaveContext.execute(model, ctx, "ref").ui == {"text": ["Saved ref_00001.safetensors"]}
    header = pack.core.context_file.read_context_metadata(context_dir / "ref.safetensors")
    assert header["extra"] == {"resize_mode": "stretch"}
    assert header["fingerprint"] == pack.core.context_file.model_fingerprint(model.model.head, model.extractor)
    assert pack.context_nodes.context_choices() == ["ref.safetensors", "ref_00001.safetensors"]

    load = pack.context_nodes.IconMattingLoadContext
    assert load.validate_inputs("ref.safetensors") is True
    loaded = load.execute(stand_in_model(), "ref.safetensors").result
    assert len(loaded) == 1 and torch.equal(loaded[0].tokens, ctx.tokens)
    assert (loaded[0].token_counts, loaded[0].config, loaded[0].pooling, loaded[0].seed, loaded[0].reference_sizes,
            loaded[0].resize_mode) == ((2, 3), ctx.config, "scribble", 7, ((4, 6), (5, 3)), "stretch")


def test_load_context_made_with_other_weights_names_the_nodes(pack, context_dir):
    pack.context_nodes.IconMattingSaveContext.execute(stand_in_model(0), hand_made_context(pack), "ref")
    with pytest.raises(ValueError) as info:
        pack.context_nodes.IconMattingLoadContext.execute(stand_in_model(1), "ref.safetensors")
    text = str(info.value)
    assert type(info.value) is ValueError and info.value.__cause__ is None and info.value.__suppress_context__
    assert text.startswith(f"{context_dir / 'ref.safetensors'} was encoded with other model weights (fingerprint ")
    assert text.endswith(f"or encode the reference again ({ENCODE}, then {SAVE}).")


def test_load_context_of_a_missing_file(pack, context_dir):
    load = pack.context_nodes.IconMattingLoadContext
    context_dir.mkdir()
    assert load.validate_inputs("gone.safetensors") == ("Context file 'gone.safetensors' is not in ComfyUI/models/"
                                                        f"iconmatting_contexts. Save one with {SAVE} first.")
    missing = "The input 'context_file' of IconMatting 2 · Load Context is empty. Choose a value (API clients: send it in the prompt)."
    assert load.validate_inputs("") == load.validate_inputs(7) == missing
    with pytest.raises(FileNotFoundError) as info:
        load.execute(stand_in_model(), "gone.safetensors")
    assert str(info.value) == f"'gone.safetensors' is not in {context_dir}. Save one with {SAVE} first."


# --- context-file errors in the words of the nodes ---------------------------------------------------------
@pytest.mark.parametrize("message, expected", [
    ("context file not found: /c/a.safetensors. Make one with `python -m iconmatting_core encode ... --out /c/a.safetensors`.",
     f"context file not found: /c/a.safetensors. {MAKE_ONE}"),
    ("cannot read context file /c/a: OSError: bad. Is it a context file written by `encode`?",
     f"cannot read context file /c/a: OSError: bad. Is it a context file? {MAKE_ONE}"),
    ("/c/a is not an IconMatting context file (no 'iconmatting_context' metadata); make one with `encode`.",
     f"/c/a is not an IconMatting context file (no 'iconmatting_context' metadata); make one with {SAVE}."),
    ("/c/a has context format version 9; this version of iconmatting_core reads up to 1. Update the pack, or encode the "
     "reference again.",
     "/c/a has context format version 9; this version of iconmatting_core reads up to 1. Update the pack, or encode the "
     f"reference again ({ENCODE}, then {SAVE})."),
    ("/c/a holds context fields this version does not know (x); update the pack or encode again.",
     f"/c/a holds context fields this version does not know (x); update the pack or encode the reference again ({ENCODE}, "
     f"then {SAVE})."),
    ("/c/a: the metadata is not valid JSON (JSONDecodeError); the file is damaged or was not written by `encode`. "
     "Encode the reference again.",
     "/c/a: the metadata is not valid JSON (JSONDecodeError); the file is damaged or was not written by "
     f"{SAVE}. Encode the reference again ({ENCODE}, then {SAVE})."),
    ("Load the weights it was made with, or encode the reference again with these weights.",
     f"Load the weights it was made with, or encode the reference again ({ENCODE}, then {SAVE})."),
])
def test_context_file_errors_name_the_nodes(pack, message, expected):
    error = pack.core.context_file.ContextFileError(message)
    assert pack.context_nodes.node_context_message(error) == expected


def test_load_context_of_a_damaged_file_names_the_nodes(pack, context_dir):
    from safetensors.torch import save_file

    context_dir.mkdir()
    save_file({"tokens": torch.zeros(1, 8)}, str(context_dir / "bad.safetensors"), metadata={"iconmatting_context": "{not json"})
    with pytest.raises(ValueError) as info:
        pack.context_nodes.IconMattingLoadContext.execute(stand_in_model(), "bad.safetensors")
    assert str(info.value) == (f"{context_dir / 'bad.safetensors'}: the metadata is not valid JSON (JSONDecodeError); the file "
                               f"is damaged or was not written by {SAVE}. Encode the reference again ({ENCODE}, then {SAVE}).")
