"""The nodes called directly (as ComfyUI core tests its nodes), inside this process, over the ComfyUI
0.3.75 tree of ``comfy_harness.comfy_root()`` and the tiny diffusers model: fast checks of what each
node's ``execute``/``validate_inputs`` does with pixels, files and bad inputs. The real ComfyUI runs
of tests/host/test_comfy_pack.py cover the integration (server, validation, the host's own SD 2.x)."""
import logging
import math
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sample_inputs import make_reference, make_targets



def save_png(path, array):
    Image.fromarray(array).save(path)


def pixels(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- Composite ------------------------------------------------------------------------------------------
def test_composite_puts_each_cut_out_over_its_own_background(pack):
    cut = torch.zeros(2, 1, 2, 4)
    cut[..., 0] = 1.0  # red
    cut[..., 3] = torch.tensor([0.25, 1.0])
    backgrounds = [torch.tensor([0.0, 0.0, 1.0]).expand(1, 3, 5, 3), torch.tensor([0.0, 1.0, 0.0]).expand(1, 3, 5, 3)]
    out = pack.output_nodes.IconMattingComposite.execute([cut], backgrounds).result[0]
    assert [o.shape for o in out] == [(1, 1, 2, 3)] * 2
    assert torch.allclose(out[0][0, 0], torch.tensor([[0.25, 0, 0.75], [1, 0, 0]]))
    assert torch.allclose(out[1][0, 0], torch.tensor([[0.25, 0.75, 0], [1, 0, 0]]))


def test_composite_with_one_background_puts_every_cut_out_over_it(pack):
    cut = torch.zeros(3, 1, 1, 4)
    cut[..., 3] = torch.tensor([0.0, 0.5, 1.0])[:, None, None]
    out = pack.output_nodes.IconMattingComposite.execute([cut], [torch.full((1, 4, 4, 3), 0.8)]).result[0]
    assert [float(o[0, 0, 0, 0]) for o in out] == pytest.approx([0.8, 0.4, 0.0])


def test_composite_refuses_rgb_cut_outs_and_unpaired_backgrounds(pack):
    node = pack.output_nodes.IconMattingComposite
    with pytest.raises(ValueError, match=r"^rgba must have 4 channels\. Connect the rgba output of IconMatting 5 · Remove Background\.$"):
        node.execute([torch.zeros(1, 2, 2, 3)], [torch.zeros(1, 2, 2, 3)])
    with pytest.raises(ValueError, match=r"^Got 3 cut-outs and 2 backgrounds\. Give 1 background for all cut-outs, "
                                         r"1 cut-out for all backgrounds, or one background per cut-out \(in order\)\.$"):
        node.execute([torch.zeros(3, 2, 2, 4)], [torch.zeros(2, 2, 2, 3)])
    with pytest.raises(ValueError, match="Got 2 cut-outs and 3 backgrounds"):  # a list of 2 over a list of 3
        node.execute([torch.zeros(1, 2, 2, 4)] * 2, [torch.zeros(1, 2, 2, 3)] * 3)


#: three backgrounds (blue, green, white) and what a red pixel of alpha 0.25 over each gives: 0.25 red + 0.75 background
BACKGROUNDS = ([0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0])
OVER_EACH = ([0.25, 0.0, 0.75], [0.25, 0.75, 0.0], [1.0, 0.75, 0.75])


@pytest.mark.parametrize("shape", ["list", "batch"])
def test_one_cut_out_over_many_backgrounds_gives_one_composite_per_background(pack, shape):
    """A product on many backgrounds: one cut-out (a one-image batch, or a list of one) over three backgrounds
    (a list from a folder loader, or one batch), in the backgrounds' order, each at the cut-out's size."""
    cut = torch.zeros(1, 1, 2, 4)
    cut[..., 0] = 1.0  # red
    cut[..., 3] = torch.tensor([0.25, 1.0])  # left pixel a quarter opaque, right pixel opaque
    colours = [torch.tensor(c).expand(3, 5, 3) for c in BACKGROUNDS]
    backgrounds = [c[None] for c in colours] if shape == "list" else [torch.stack(colours)]
    cutouts = [cut] if shape == "batch" else [cut[0][None]]
    out = pack.output_nodes.IconMattingComposite.execute(cutouts, backgrounds).result[0]
    assert [tuple(o.shape) for o in out] == [(1, 1, 2, 3)] * 3
    assert [o[0, 0, 0].tolist() for o in out] == [pytest.approx(c) for c in OVER_EACH]
    assert all(o[0, 0, 1].tolist() == [1.0, 0.0, 0.0] for o in out)


# --- Load Image Folder ----------------------------------------------------------------------------------
def test_folder_loader_reads_every_image_extension_in_any_case_in_name_order(pack, input_dir):
    folder = input_dir / "photos"
    folder.mkdir()
    arrays = {"B.JPG": pixels(1, 4, 6), "a.png": pixels(2, 5, 3), "c.WebP": pixels(3, 2, 2)}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name, quality=100, lossless=True) if name != "B.JPG" else \
            Image.fromarray(array).save(folder / name, format="JPEG", quality=100)
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder named like an image
    images, names = pack.target_nodes.IconMattingLoadImageFolder.execute("photos").result
    assert names == ["B", "a", "c"]  # sorted by file name, extensions of any case
    assert [tuple(i.shape) for i in images] == [(1, 4, 6, 3), (1, 5, 3, 3), (1, 2, 2, 3)]
    assert torch.equal(images[1][0], torch.from_numpy(arrays["a.png"]).float() / 255)
    jpeg = np.array(Image.open(folder / "B.JPG").convert("RGB"))
    assert torch.equal(images[0][0], torch.from_numpy(jpeg).float() / 255)


def test_folder_loader_skips_unreadable_files_and_says_so_on_the_node(pack, input_dir, caplog):
    caplog.set_level(logging.INFO, logger="IconMatting")
    folder = input_dir / "photos"
    folder.mkdir()
    save_png(folder / "good.png", pixels(4, 3, 3))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "worse.png").write_bytes(b"")
    out = pack.target_nodes.IconMattingLoadImageFolder.execute("photos")
    images, names = out.result
    assert names == ["good"] and len(images) == 1
    note = ("Found 3 image(s) in 'photos'; loaded 1. Skipped 2 unreadable file(s): broken.png (cannot identify image "
            "file 'broken.png'); worse.png (cannot identify image file 'worse.png').")
    assert out.ui == {"text": [note], "iconmatting_warning": [True]}  # on the node, and a toast
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", "IconMatting: " + note)]  # the log, once


def test_folder_loader_loads_subfolders_with_distinct_names_unless_told_not_to(pack, input_dir, caplog):
    """2 photos at the top, 2 in subfolders with the same file name: 4 images, named by their path under the folder
    (as the command line names its outputs), so two x.png never share a name; without recursion the 2 at the top,
    and the node says it left 2 subfolders out."""
    caplog.set_level(logging.INFO, logger="IconMatting")
    folder = input_dir / "photos"
    arrays = {"top1.png": pixels(10, 3, 4), "top2.png": pixels(11, 5, 2), "a/x.png": pixels(12, 2, 2), "b/x.png": pixels(13, 4, 4)}
    for name, array in arrays.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_png(folder / name, array)
    node = pack.target_nodes.IconMattingLoadImageFolder
    out = node.execute("photos")
    images, names = out.result
    assert names == ["top1", "top2", "a/x", "b/x"]
    for image, name in zip(images, ["top1.png", "top2.png", "a/x.png", "b/x.png"]):
        assert torch.equal(image[0], torch.from_numpy(arrays[name]).float() / 255), name
    assert out.ui == {"text": ["Found 4 image(s) in 'photos' (2 in subfolders); loaded 4."], "iconmatting_warning": [False]}
    flat = node.execute("photos", False)
    assert flat.result[1] == ["top1", "top2"]
    assert flat.ui["text"] == ["Found 2 image(s) in 'photos'; loaded 2. 2 subfolder(s) not searched (recursive is off)."]
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]
    assert len(node.fingerprint_inputs("photos")) == 4 and len(node.fingerprint_inputs("photos", False)) == 2


def test_folder_loader_names_what_it_left_out_and_refuses_a_folder_with_images_only_below(pack, input_dir):
    folder = input_dir / "photos"
    (folder / "deeper").mkdir(parents=True)
    save_png(folder / "deeper" / "a.png", pixels(14, 2, 2))
    (folder / "clip.mp4").write_bytes(b"not decoded")
    (folder / "notes.txt").write_text("x")
    (folder / "deeper" / "more.txt").write_text("x")
    node = pack.target_nodes.IconMattingLoadImageFolder
    out = node.execute("photos")
    assert out.result[1] == ["deeper/a"]
    assert out.ui["text"] == ["Found 1 image(s) in 'photos' (1 in subfolders); loaded 1. Left out 2 file(s) that are not "
                              "images: .txt x2. Left out 1 clip(s) (videos and animated GIF/WebP/PNG files, whose frames are "
                              "not one photo): clip.mp4. Matte them with Load Video (the video workflow) or the command line."]
    assert out.ui["iconmatting_warning"] == [True]  # a clip left out is a toast, not only a line on the node
    with pytest.raises(FileNotFoundError) as info:
        node.execute("photos", False)
    assert str(info.value) == ("Image folder 'photos' holds no images at its top level, only in subfolders. Turn "
                               "recursive on to load them.")


def _animation(path, greys):
    frames = [Image.fromarray(np.full((4, 6, 3), g, np.uint8)) for g in greys]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_animated_files_are_clips_the_folder_loader_names_not_their_first_frames(pack, input_dir):
    """An animated PNG (APNG), GIF and WebP among photos: left out by name as clips (a warning), never loaded as
    their first frame; a one-frame GIF is a photo; a folder of clips alone says where clips are matted."""
    folder = input_dir / "mixed"
    folder.mkdir()
    save_png(folder / "photo.png", pixels(15, 4, 6))
    _animation(folder / "anim.png", [10, 200])
    _animation(folder / "anim.gif", [10, 200, 90])
    _animation(folder / "anim.webp", [10, 200])
    _animation(folder / "still.gif", [70])
    out = pack.target_nodes.IconMattingLoadImageFolder.execute("mixed")
    images, names = out.result
    assert names == ["photo", "still"] and [tuple(i.shape) for i in images] == [(1, 4, 6, 3), (1, 4, 6, 3)]
    assert out.ui == {"text": ["Found 2 image(s) in 'mixed'; loaded 2. Left out 3 clip(s) (videos and animated "
                               "GIF/WebP/PNG files, whose frames are not one photo): anim.gif; anim.png; anim.webp. Matte "
                               "them with Load Video (the video workflow) or the command line."],
                      "iconmatting_warning": [True]}
    clips = input_dir / "clips"
    clips.mkdir()
    for i in range(7):
        _animation(clips / f"c{i}.png", [10, 200])
    with pytest.raises(FileNotFoundError) as info:
        pack.target_nodes.IconMattingLoadImageFolder.execute("clips")
    assert str(info.value) == ("Image folder 'clips' holds no photos, only 7 clip(s) (videos and animated GIF/WebP/PNG "
                               "files, whose frames are not one photo): c0.png; c1.png; c2.png; c3.png; c4.png; and 2 more. "
                               "Matte them with Load Video (the video workflow) or the command line.")


def test_a_folder_past_the_limit_says_the_command_line_is_the_tool_with_the_command(pack, input_dir, monkeypatch):
    import folder_paths

    monkeypatch.setattr(pack.target_nodes, "COMMAND_LINE_FROM", 3)
    folder = input_dir / "catalogue"
    folder.mkdir()
    for i in range(3):
        save_png(folder / f"p{i}.png", pixels(20 + i, 2, 2))
    out = pack.target_nodes.IconMattingLoadImageFolder.execute("catalogue")
    text = out.ui["text"][0]
    assert text.startswith("Found 3 image(s) in 'catalogue'; loaded 3. 3 images: for a folder this size the command "
                           "line is the tool")
    models, output = folder_paths.models_dir, folder_paths.get_output_directory()
    command = (f"python {pack.target_nodes.PACK_DIR}/iconmatting.py matte --context "
               f"{folder_paths.get_folder_paths('iconmatting_contexts')[0]}/reference_context.safetensors --targets {folder} "
               f"--out {output}/iconmatting --sd {folder_paths.get_folder_paths('checkpoints')[0]}/"
               f"v2-1_768-ema-pruned.safetensors --matting-weights {models}/iconmatting/icm.ckpt")
    assert text.endswith(command), text
    assert out.ui["iconmatting_warning"] == [True]
    two = pack.target_nodes.IconMattingLoadImageFolder.execute  # under the limit: no hint, no warning
    (folder / "p2.png").unlink()
    assert two("catalogue").ui == {"text": ["Found 2 image(s) in 'catalogue'; loaded 2."], "iconmatting_warning": [False]}


def test_folder_loader_fails_only_when_no_file_can_be_read(pack, input_dir):
    folder = input_dir / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"junk")
    (folder / "b.jpg").write_bytes(b"")
    unreadable = r"^No image in folder 'photos' could be read: a\.png \(.+\); b\.jpg \(.+\)\. Replace the files\.$"
    with pytest.raises(ValueError, match=unreadable):
        pack.target_nodes.IconMattingLoadImageFolder.execute("photos")


NO_FOLDER = "No image folder given. Type the name of a folder inside ComfyUI/input (e.g. iconmatting_targets)."


@pytest.mark.parametrize("value, expected", [
    ("", NO_FOLDER),
    ("   ", NO_FOLDER),
    (None, NO_FOLDER),
    (".", "Image folder '.' is ComfyUI/input itself. Put the target photos in a folder inside it and give its name."),
    ("missing", "Image folder 'missing' not found in ComfyUI/input. Create it and put the target photos in it."),
    ("empty", "Image folder 'empty' holds no images. Put .png/.jpg/.webp target photos in it."),
    ("../outside", "Image folder '../outside' is outside ComfyUI's input folder. Put the photos in a folder inside "
                   "ComfyUI/input (or link one there) and give its name."),
])
def test_folder_loader_refuses_bad_folders_at_validation(pack, input_dir, value, expected):
    (input_dir / "empty").mkdir()
    (input_dir / "empty" / "readme.txt").write_text("x")
    save_png(input_dir / "top.png", pixels(5, 2, 2))  # an image at the top of input/ is never matted by mistake
    assert pack.target_nodes.IconMattingLoadImageFolder.validate_inputs(value) == expected


def test_folder_loader_accepts_a_folder_of_images_at_validation(pack, input_dir):
    (input_dir / "photos" / "sub").mkdir(parents=True)
    save_png(input_dir / "photos" / "sub" / "a.png", pixels(6, 2, 2))
    assert pack.target_nodes.IconMattingLoadImageFolder.validate_inputs(" photos/sub ") is True


def test_folder_loader_validation_without_the_key_is_a_message_not_a_crash(pack, input_dir):
    assert pack.target_nodes.IconMattingLoadImageFolder.validate_inputs() == NO_FOLDER


def test_folder_fingerprint_of_a_bad_folder_is_nan_so_the_node_runs_again(pack, input_dir):
    assert math.isnan(pack.target_nodes.IconMattingLoadImageFolder.fingerprint_inputs("missing"))


def test_folder_is_read_again_when_a_file_changes_even_at_the_same_size(pack, input_dir):
    node = pack.target_nodes.IconMattingLoadImageFolder
    folder = input_dir / "photos"
    folder.mkdir()
    save_png(folder / "a.png", np.full((4, 4, 3), 10, np.uint8))
    before = node.fingerprint_inputs("photos")
    size = (folder / "a.png").stat().st_size
    save_png(folder / "a.png", np.full((4, 4, 3), 200, np.uint8))
    stat = (folder / "a.png").stat()
    os.utime(folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert (folder / "a.png").stat().st_size == size  # same size, other content
    assert node.fingerprint_inputs("photos") != before
    save_png(folder / "b.png", np.zeros((4, 4, 3), np.uint8))
    assert len(node.fingerprint_inputs("photos")) == 2


# --- Encode Reference, Save Context, Load Context -------------------------------------------------------
def test_fixed_choices_are_combos_the_host_checks_itself(pack):
    """A combo typed by its options (as hosts check them: tests/host/test_comfy_pack.py sends wrong values), with no
    validate_inputs of the node naming them (the host would report its message under every input it names)."""
    encode = pack.context_nodes.IconMattingEncodeReference
    match = pack.target_nodes.IconMattingMatchTargets
    required = encode.INPUT_TYPES()["required"]
    assert required["guidance"][0] == ["mask", "scribble"] and required["resize_mode"][0] == ["pad", "stretch"]
    assert match.INPUT_TYPES()["required"]["resize_mode"][0] == ["pad", "stretch"]
    assert required["resize_mode"][1]["default"] == "pad" and required["resize_mode"][1]["advanced"] is True
    for node in (encode, match):
        assert "validate_inputs" not in vars(node)


def test_encode_refuses_unknown_combo_values_naming_the_input(pack, host_model):
    node = pack.context_nodes.IconMattingEncodeReference
    image, mask = make_reference(64, 96)
    with pytest.raises(ValueError, match="guidance must be one of"):
        node.execute(host_model, image[None], mask[None], "points")


def test_encode_says_how_to_paint_an_unpainted_reference(pack, host_model):
    image, _ = make_reference(96, 128)
    with pytest.raises(ValueError, match="Open in MaskEditor"):
        pack.context_nodes.IconMattingEncodeReference.execute(host_model, image[None], torch.zeros(1, 64, 64), "mask")


def test_save_context_never_overwrites_a_saved_context(pack, host_model, context_dir, contexts):
    node = pack.context_nodes.IconMattingSaveContext
    first, second = contexts
    assert node.execute(host_model, first, "my_ref").ui["text"] == ["Saved my_ref.safetensors"]
    saved = (context_dir / "my_ref.safetensors").read_bytes()
    assert node.execute(host_model, second, "my_ref").ui["text"] == ["Saved my_ref_00001.safetensors"]
    assert node.execute(host_model, second, "my_ref.safetensors").ui["text"] == ["Saved my_ref_00002.safetensors"]
    assert (context_dir / "my_ref.safetensors").read_bytes() == saved
    assert sorted(p.name for p in context_dir.iterdir()) == ["my_ref.safetensors", "my_ref_00001.safetensors",
                                                              "my_ref_00002.safetensors"]
    assert node.execute(host_model, first, "  ").ui["text"] == ["Saved reference_context.safetensors"]


def test_save_context_keeps_subfolders_and_load_context_lists_them(pack, host_model, context_dir, contexts):
    save, load = pack.context_nodes.IconMattingSaveContext, pack.context_nodes.IconMattingLoadContext
    assert save.validate_inputs("products/shoes/red") is True
    assert save.execute(host_model, contexts[0], "products/shoes/red").ui["text"] == ["Saved products/shoes/red.safetensors"]
    assert save.execute(host_model, contexts[1], "products\\shoes\\red").ui["text"] == [
        "Saved products/shoes/red_00001.safetensors"]  # either slash, never overwritten
    assert save.execute(host_model, contexts[1], "products/").ui["text"] == ["Saved products/reference_context.safetensors"]
    assert (context_dir / "products" / "shoes" / "red.safetensors").is_file()
    listed = load.define_schema().inputs[1].options
    assert listed == ["products/reference_context.safetensors", "products/shoes/red.safetensors",
                      "products/shoes/red_00001.safetensors"]
    loaded = load.execute(host_model, "products/shoes/red_00001.safetensors").result[0]
    assert torch.equal(loaded.tokens, contexts[1].tokens)


@pytest.mark.parametrize("name, why", [("../escape", "leaves"), ("a/../../escape", "leaves"), ("..\\escape", "leaves"),
                                       ("/tmp/escape", "is an absolute path"), ("C:\\escape", "is an absolute path")])
def test_save_context_refuses_names_outside_the_contexts_folder(pack, host_model, context_dir, contexts, name, why):
    node = pack.context_nodes.IconMattingSaveContext
    message = node.validate_inputs(name)
    assert message.startswith(f"The file name '{name}' {why}") and "ComfyUI/models/iconmatting_contexts" in message
    with pytest.raises(ValueError) as info:
        node.execute(host_model, contexts[0], name)
    assert str(info.value) == message
    assert not context_dir.exists() or list(context_dir.rglob("*.safetensors")) == []


def test_load_context_errors_name_the_nodes_not_the_command_line(pack, host_model, context_dir, contexts):
    context_dir.mkdir()
    pack.core.context_file.save_context(context_dir / "other.safetensors", contexts[0], "0" * 64)
    (context_dir / "junk.safetensors").write_bytes(b"not a safetensors file")
    node = pack.context_nodes.IconMattingLoadContext
    for name in ("other.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError) as info:
            node.execute(host_model, name)
        text = str(info.value)
        assert type(info.value) is ValueError and name in text
        assert "`" not in text and "python -m" not in text and "Save Context" in text, text
    assert "not in ComfyUI/models/iconmatting_contexts" in node.validate_inputs("nope.safetensors")
    assert "The input 'context_file'" in node.validate_inputs(None) and "The input" in node.validate_inputs()


def test_a_saved_context_loads_back_equal(pack, host_model, context_dir, contexts):
    ctx = contexts[1]
    pack.context_nodes.IconMattingSaveContext.execute(host_model, ctx, "ref")
    loaded = pack.context_nodes.IconMattingLoadContext.execute(host_model, "ref.safetensors").result[0]
    assert torch.equal(loaded.tokens, ctx.tokens)


# --- Match Targets ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def contexts(host_model):
    pipe = host_model.pipeline()
    image, mask = make_reference(64, 96)
    return pipe.encode_reference(image, mask), pipe.encode_reference(torch.flip(image, [0]), 1 - mask, seed=3)


@pytest.fixture(scope="module")
def matched(pack, host_model, contexts):
    """Match Targets run on one 48x64 target with the first context (stretch): (target, match, previews)."""
    target = make_targets(1, 48, 64)
    match, previews = pack.target_nodes.IconMattingMatchTargets.execute(
        [host_model], [contexts[0]], [target], ["stretch"]).result
    return target, match, previews


def test_match_uses_every_context_given(pack, host_model, contexts, matched):
    target, only_first, _ = matched
    both = pack.target_nodes.IconMattingMatchTargets.execute([host_model], list(contexts), [target], ["stretch"]).result[0]
    assert both.similarity.shape == only_first.similarity.shape
    assert not torch.allclose(both.similarity, only_first.similarity)


def test_match_preview_spans_the_whole_heat_ramp(matched):
    target, _, previews = matched
    preview = previews[0][0]
    assert preview.shape == (48, 64, 3)
    # at the most similar pixel the heat map is the ramp's end (red), at the least its start (dark blue)
    flat = ((preview - 0.4 * target[0]) / 0.6).reshape(-1, 3)
    for end in ([1.0, 0.0, 0.0], [0.0, 0.0, 0.3]):
        assert (flat - torch.tensor(end)).abs().sum(1).min() < 1e-4, end


def test_match_refuses_unknown_modes_and_what_is_no_context_in_so_many_words(pack, host_model, contexts, matched):
    node, target = pack.target_nodes.IconMattingMatchTargets, matched[0]
    with pytest.raises(ValueError) as info:
        node.execute([host_model], [contexts[0]], [target], ["crop"])
    assert str(info.value) == "resize_mode must be one of pad, stretch; got 'crop'."
    with pytest.raises(TypeError) as info:
        node.execute([host_model], [contexts[0], "nope"], [target])
    assert str(info.value) == "context must come from IconMatting 2 · Encode Reference or Load Context."


def test_match_defaults_to_pad_and_one_target_per_pass(pack, host_model, contexts, matched):
    pipe, calls = host_model.pipeline(), []
    recording = types.SimpleNamespace(config=pipe.config, match=lambda ctx, targets, **kw: calls.append(kw) or pipe.match(
        ctx, targets, **kw))
    match = pack.target_nodes.IconMattingMatchTargets.execute(
        [types.SimpleNamespace(pipeline=lambda features=True: recording)], [contexts[0]], [matched[0]]).result[0]
    assert [(c["resize_mode"], c["chunk_size"]) for c in calls] == [("pad", 1)] and match.resize_mode == "pad"


# --- Remove Background (Decode Alpha) ------------------------------------------------------------------
def test_decode_cleans_edge_colours_only_when_asked(pack, host_model, matched):
    target, match, _ = matched
    node = pack.output_nodes.IconMattingDecodeAlpha
    asked = []
    decoding_only = types.SimpleNamespace(  # decoding needs only the head placed, not the SD models
        model=host_model.model, extractor=host_model.extractor,
        pipeline=lambda features=True: asked.append(features) or host_model.pipeline())
    alphas, raw = node.execute(decoding_only, match, False).result
    assert asked == [False]
    _, cleaned = node.execute(host_model, match, True).result
    alpha = alphas[0][0]
    assert alphas[0].shape == (1, 48, 64) and raw[0].shape == cleaned[0].shape == (1, 48, 64, 4)
    assert torch.equal(raw[0][0, ..., :3], target[0])  # colours as photographed
    assert torch.equal(raw[0][0, ..., 3], alpha) and torch.equal(cleaned[0][0, ..., 3], alpha)
    edge = (alpha > 0) & (alpha < 1)
    assert edge.any()
    changed = (cleaned[0][0, ..., :3] != target[0]).any(-1)
    assert changed.any() and not changed[~edge].any()  # only semi-transparent pixels are re-coloured


def test_decode_refuses_what_is_not_a_match(pack, host_model):
    with pytest.raises(TypeError, match=r"^match must come from IconMatting 4 · Match Targets\.$"):
        pack.output_nodes.IconMattingDecodeAlpha.execute(host_model, "nope", True)


def test_decode_takes_4_targets_at_once_unless_told(pack, host_model, matched):
    _, match, _ = matched
    pipe, chunks = host_model.pipeline(), []
    recording = types.SimpleNamespace(cutout=pipe.cutout, decode=lambda m, chunk_size, **kw: chunks.append(chunk_size) or pipe.decode(
        m, chunk_size=chunk_size, **kw))
    model = types.SimpleNamespace(pipeline=lambda features=True: recording)
    pack.output_nodes.IconMattingDecodeAlpha.execute(model, match, False)
    pack.output_nodes.IconMattingDecodeAlpha.execute(model, match, False, 9)
    assert chunks == [4, 9]


# --- Load ------------------------------------------------------------------------------------------------
def test_load_validation_of_an_empty_or_missing_choice_is_a_message(pack):
    node = pack.model_nodes.IconMattingLoad
    for message in (node.validate_inputs(None), node.validate_inputs()):
        assert "The input 'matting_model' of IconMatting 1 · Load is empty" in message and "Download icm.ckpt" in message
    assert "'nope.ckpt' are not in" in node.validate_inputs("nope.ckpt")


def test_a_head_for_other_unet_widths_is_refused_in_one_line(pack):
    with pytest.raises(ValueError) as info:
        pack.model_nodes.head_fits_model((64, 64), (128, 128), "small.safetensors")
    text = str(info.value)
    assert "'small.safetensors'" in text and "(64, 64)" in text and "(128, 128)" in text and "\n" not in text
    pack.model_nodes.head_fits_model((128, 128), (128, 128), "ok.safetensors")
    pack.model_nodes.head_fits_model((128, 128), None, "ok.safetensors")  # not a UNet: the extractor says why


def test_the_patched_model_warning_has_one_text(pack):
    assert pack.model_nodes.patches_warning(types.SimpleNamespace(patches={})) is None
    assert pack.model_nodes.patches_warning(types.SimpleNamespace(patches={"a": 1, "b": 2})) == (
        "The MODEL carries 2 weight patches (e.g. a LoRA). IconMatting was trained on plain SD 2.1 features: connect "
        "Load Checkpoint's MODEL directly for faithful mattes.")


def test_a_missing_file_at_execution_is_one_line_with_the_hint(pack, context_dir):
    with pytest.raises(FileNotFoundError) as info:
        pack.common.full_path("iconmatting_contexts", "gone.safetensors", "Save one first.")
    assert "'gone.safetensors' is not in" in str(info.value) and str(info.value).endswith("Save one first.")


def test_nodes_are_registered_in_pipeline_order(pack):
    names = [n.define_schema().display_name for n in pack.iconmatting_nodes.NODES]
    assert names == ["IconMatting 1 · Load", "IconMatting 2 · Encode Reference", "IconMatting 2 · Load Context",
                     "IconMatting 2 · Save Context", "IconMatting 3 · Load Image Folder", "IconMatting 4 · Match Targets",
                     "IconMatting 5 · Remove Background", "IconMatting 6 · Composite Cutouts"]
