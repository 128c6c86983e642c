// IconMatting: what a node says about its run (nodes/common.py, node_note), shown where every frontend shows it.
//
// A node's note arrives as its ui "text" in the "executed" message; hosts with intermediate outputs (0.28.2) send it
// again when the node is cached. The host's own progress text is not enough: frontend 1.58 removes it from the node
// when the run ends, in both renderers. So the note is written on the node as a read-only text widget, which the
// litegraph canvas and the Vue nodes ("Nodes 2.0") both draw (frontends 1.32 to 1.58), is cleared when the node
// runs again (a cached node keeps it), and is never saved with the workflow nor sent with a prompt. A warning also
// shows in a toast when the run ends (where the user looks when "Job completed" shows), until closed; once per node
// and text, since a cached node sends its note again on every run.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NOTE_WIDGET = "iconmatting_note";
const WARNING_KEY = "iconmatting_warning"; // nodes/common.py WARNING_KEY
const pendingWarnings = new Map(); // node -> text, toasted when the run ends

function removeNote(node) {
  const index = node.widgets?.findIndex((w) => w.name === NOTE_WIDGET) ?? -1;
  if (index < 0) return;
  const [widget] = node.widgets.splice(index, 1);
  widget.onRemove?.();
  const size = node.computeSize?.();
  if (size) node.setSize?.([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

function showNote(node, text) {
  let widget = node.widgets?.find((w) => w.name === NOTE_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, NOTE_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    widget.options.serialize = false;
    widget.options.read_only = true;
    if (widget.element) {
      widget.element.readOnly = true;
    }
    const size = node.computeSize?.(); // room for the note (the Vue nodes size themselves)
    if (size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  widget.value = text;
  if (widget.element) widget.element.value = text;
  node.setDirtyCanvas?.(true, true);
}

function toastWarnings() {
  for (const [node, text] of pendingWarnings) {
    if (node.iconmattingToasted === text) continue;
    node.iconmattingToasted = text;
    app.extensionManager?.toast?.add({ severity: "warn", summary: node.title, detail: text });
  }
  pendingWarnings.clear();
}

function isOurs(node) {
  return typeof node?.comfyClass === "string" && node.comfyClass.startsWith("IconMatting");
}

app.registerExtension({
  name: "IconMatting.Notes",
  setup() {
    api.addEventListener("executing", ({ detail }) => {
      const node = detail == null ? null : app.graph?.getNodeById?.(detail);
      if (isOurs(node)) removeNote(node); // running again: its new note (if any) follows in "executed"
    });
    for (const end of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(end, toastWarnings);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("IconMatting")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = (output?.text ?? []).join("\n");
      if (!text) return;
      showNote(this, text);
      if ((output[WARNING_KEY] ?? []).some(Boolean)) pendingWarnings.set(this, text);
    };
  },
});
