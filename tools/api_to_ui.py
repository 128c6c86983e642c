"""Build a drag-and-drop (UI-format) ComfyUI workflow from an API-format twin.

    python tools/api_to_ui.py workflows/api/iconmatting_batch.json workflows/iconmatting_batch.json

Widget order per node type is listed in WIDGETS (it must follow each node's INPUT_TYPES order;
tests/test_comfy_pack.py checks the committed files against the real ComfyUI's object_info).
"""
import json
import sys

WIDGETS = {
    "IconMattingModelLoader": ["matting_model", "sd_model", "dtype"],
    "IconMattingEncodeReference": ["guidance", "resize_mode", "seed", "control_after_generate"],
    "IconMattingMatchTargets": ["resize_mode", "chunk_size"],
    "IconMattingDecodeAlpha": ["estimate_foreground", "chunk_size"],
    "IconMattingComposite": [],
    "LoadImage": ["image", "upload"],
    "ImageBatch": [],
    "PreviewImage": [],
    "SaveImage": ["filename_prefix"],
    "MaskToImage": [],
}
EXTRA_WIDGET_VALUES = {"control_after_generate": "fixed", "upload": "image"}
# output (name, type) per node type
OUTPUTS = {
    "IconMattingModelLoader": [("iconmatting_model", "ICONMATTING_MODEL")],
    "IconMattingEncodeReference": [("context", "ICONMATTING_CONTEXT")],
    "IconMattingMatchTargets": [("match", "ICONMATTING_MATCH"), ("guidance_preview", "IMAGE")],
    "IconMattingDecodeAlpha": [("alpha", "MASK"), ("rgba", "IMAGE")],
    "IconMattingComposite": [("IMAGE", "IMAGE")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageBatch": [("IMAGE", "IMAGE")],
    "PreviewImage": [],
    "SaveImage": [],
    "MaskToImage": [("IMAGE", "IMAGE")],
}


def convert(api: dict) -> dict:
    ids = sorted(api, key=int)
    links, nodes = [], []
    out_links = {i: {} for i in ids}
    inputs_of = {}
    for nid in ids:
        ins = []
        for name, value in api[nid]["inputs"].items():
            if isinstance(value, list):
                src, slot = value
                link_id = len(links) + 1
                link_type = OUTPUTS[api[src]["class_type"]][slot][1]
                links.append([link_id, int(src), slot, int(nid), len(ins), link_type])
                out_links[src].setdefault(slot, []).append(link_id)
                ins.append({"name": name, "type": link_type, "link": link_id})
        inputs_of[nid] = ins
    depth = {}

    def level(nid):
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(s) for s in srcs), default=-1)
        return depth[nid]

    rows = {}
    for order, nid in enumerate(sorted(ids, key=lambda i: (level(i), int(i)))):
        node = api[nid]
        ctype = node["class_type"]
        col = level(nid)
        row = rows.get(col, 0)
        rows[col] = row + 1
        widgets = [node["inputs"].get(w, EXTRA_WIDGET_VALUES.get(w)) for w in WIDGETS[ctype]]
        nodes.append({
            "id": int(nid), "type": ctype, "pos": [60 + 380 * col, 60 + 330 * row], "size": [340, 280],
            "flags": {}, "order": order, "mode": 0,
            "inputs": inputs_of[nid],
            "outputs": [
                {"name": name, "type": typ, "links": out_links[nid].get(slot, []), "slot_index": slot}
                for slot, (name, typ) in enumerate(OUTPUTS[ctype])
            ],
            "title": node.get("_meta", {}).get("title", ctype),
            "properties": {"Node name for S&R": ctype},
            "widgets_values": widgets,
        })
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        ui = convert(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(ui, f, indent=1)
        f.write("\n")
