"""What the nodes share (nodes/common.py), fast: model folders, schema compatibility, messages, progress,
list inputs and progress text, each checked against values written out here."""
import logging

import pytest
import torch


@pytest.fixture()
def folders(pack, monkeypatch, tmp_path):
    """folder_paths' registry, emptied, with ComfyUI/models at tmp_path/models."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", {})
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder_paths.folder_names_and_paths


def test_model_folders_are_registered_with_their_extensions(pack, folders, tmp_path):
    pack.common.register_model_folders()
    models = tmp_path / "models"
    assert folders == {"iconmatting": ([str(models / "iconmatting")], {".ckpt", ".safetensors", ".pth", ".pt"}),
                       "iconmatting_contexts": ([str(models / "iconmatting_contexts")], {".safetensors"})}
    pack.common.register_model_folders()  # again: nothing doubles
    assert folders["iconmatting"][0] == [str(models / "iconmatting")]


def test_model_folders_known_already_keep_their_paths_and_extensions(pack, folders, tmp_path):
    models = tmp_path / "models"
    folders["iconmatting"] = (["/elsewhere"], {".bin"})
    folders["iconmatting_contexts"] = ([str(models / "iconmatting_contexts")], {".safetensors"})
    pack.common.register_model_folders()
    assert folders["iconmatting"] == (["/elsewhere", str(models / "iconmatting")], {".bin", ".ckpt", ".safetensors", ".pth", ".pt"})
    assert folders["iconmatting_contexts"] == ([str(models / "iconmatting_contexts")], {".safetensors"})


def test_a_missing_file_names_every_folder_searched(pack, folders, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "here.ckpt").write_bytes(b"")
    folders["iconmatting"] = ([str(tmp_path / "a"), str(tmp_path / "b")], {".ckpt"})
    assert pack.common.full_path("iconmatting", "here.ckpt", "Hint.") == str(tmp_path / "a" / "here.ckpt")
    with pytest.raises(FileNotFoundError) as info:
        pack.common.full_path("iconmatting", "gone.ckpt", "Download it.")
    assert str(info.value) == f"'gone.ckpt' is not in {tmp_path / 'a'}, {tmp_path / 'b'}. Download it."
    assert info.value.__suppress_context__


def test_the_load_node_offers_the_released_weights_when_the_folder_is_empty(pack, folders):
    pack.common.register_model_folders()
    inputs = {i.id: i for i in pack.model_nodes.IconMattingLoad.define_schema().inputs}
    assert inputs["matting_model"].options == ["icm.ckpt"] and inputs["matting_model"].default == "icm.ckpt"


def test_schema_drops_the_fields_this_comfyui_does_not_know(pack):
    made = pack.common.schema(node_id="N", display_name="D", category="IconMatting", inputs=[], outputs=[], invented_field=1)
    assert (made.node_id, made.display_name, made.category) == ("N", "D", "IconMatting")
    assert not hasattr(made, "invented_field")


def test_nodes_share_the_category_and_the_types_between_them(pack):
    assert {n.define_schema().category for n in pack.iconmatting_nodes.NODES} == {"IconMatting"}
    assert (pack.common.ModelType.io_type, pack.common.ContextType.io_type, pack.common.MatchType.io_type) == (
        "ICONMATTING_MODEL", "ICONMATTING_CONTEXT", "ICONMATTING_MATCH")


def test_advanced_inputs_use_the_hosts_own_flag_or_the_extra_dict(pack):
    class Old:
        def __init__(self):
            self.extra_dict = {}

    class WithParameter(Old):
        def __init__(self, advanced=False):
            super().__init__()

    class WithAttribute(Old):
        advanced = False

    assert pack.common.advanced(Old()).extra_dict == {"advanced": True}
    for kind in (WithParameter, WithAttribute):
        inp = pack.common.advanced(kind())
        assert inp.advanced is True and inp.extra_dict == {}


def test_messages_of_choices_empty_inputs_and_precision(pack):
    with pytest.raises(ValueError) as info:
        pack.common.check_choice("size", 5, [1, 2])
    assert str(info.value) == "size must be one of 1, 2; got 5."
    pack.common.check_choice("size", 2, [1, 2])
    assert pack.common.missing_input("image", "Node X") == (
        "The input 'image' of Node X is empty. Choose a value (API clients: send it in the prompt).")
    assert pack.common.precision_hint(RuntimeError("Half overflow.")) == (
        "Half overflow. The head's precision is the dtype input of IconMatting 1 · Load (advanced inputs).")


def test_progress_reports_against_its_own_total_and_stops_when_interrupted(pack, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.updates = total, []
            bars.append(self)

        def update_absolute(self, value, total=None):
            self.updates.append((value, total))

    checks = []
    monkeypatch.setattr(pack.common.comfy.utils, "ProgressBar", Bar)
    monkeypatch.setattr(pack.common.mm, "throw_exception_if_processing_interrupted", lambda: checks.append(1))
    update = pack.common.progress(5)
    update(2, 99)
    update(5, 99)
    assert [(b.total, b.updates) for b in bars] == [(5, [(2, 5), (5, 5)])] and checks == [1, 1]

    def interrupted():
        raise InterruptedError("stop")

    monkeypatch.setattr(pack.common.mm, "throw_exception_if_processing_interrupted", interrupted)
    with pytest.raises(InterruptedError):
        update(3, 5)


def test_split_images_gives_one_hwc_image_per_image_of_every_batch(pack):
    a, b, c = torch.rand(2, 3, 4, 3), torch.rand(1, 5, 2, 3), torch.rand(6, 7, 3)
    expected = [a[0], a[1], b[0], c]
    for given in ([a, b, c], (a, b, c)):
        out = pack.common.split_images(given)
        assert len(out) == 4 and all(torch.equal(x, y) for x, y in zip(out, expected))
    out = pack.common.split_images(a)
    assert len(out) == 2 and torch.equal(out[1], a[1])
    assert len(pack.common.split_images(c)) == 1


def test_one_is_the_single_value_of_a_list_input(pack):
    assert pack.common.one([5]) == 5 and pack.common.one((6, 7)) == 6
    assert pack.common.one(8) == 8 and pack.common.one("ab") == "ab"


def test_a_node_note_is_its_ui_text_and_one_log_line(pack, caplog):
    caplog.set_level(logging.INFO, logger="IconMatting")
    assert pack.common.node_note("3 images found.") == {"text": ["3 images found."], "iconmatting_warning": [False]}
    assert pack.common.node_note("2 files skipped.", warning=True) == {"text": ["2 files skipped."],
                                                                      "iconmatting_warning": [True]}
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("IconMatting", "INFO", "IconMatting: 3 images found."), ("IconMatting", "WARNING", "IconMatting: 2 files skipped.")]
