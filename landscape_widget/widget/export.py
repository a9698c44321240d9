"""Static HTML export of the widget: the bundle, the CSS and the state inlined in one page."""

from __future__ import annotations

import base64
import gzip
import html
import json
from pathlib import Path

from .compare import export_state as compare_state

STATIC = Path(__file__).resolve().parent.parent / "static"
FIT_ARRAYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def static_page(widget, traits: tuple[str, ...], title: str) -> str:
    """The standalone HTML page of :meth:`LandscapeWidget.to_html` (see its docstring)."""
    state = {k: getattr(widget, k) for k in traits}
    state["direction_types"] = widget.direction_types
    state["_spec_schema"] = widget._spec_schema  # the spec's fields and limits (see .spec)
    state["status"] = widget.status
    state["_static"] = True  # the page has no kernel: the front end hides compute controls
    result = dict(widget.result) if widget.result else None
    if result:
        for k in ("x", "y", "loss", "accuracy"):
            if result.get(k) is not None:
                result[k] = base64.b64encode(result[k]).decode()
    state["result"] = result
    state["pattern"], state["show_pattern"] = widget.pattern, widget.show_pattern
    state["fit_status"] = widget.fit_status
    state["fit_settings"] = widget.fit_settings  # the editor's boxes show what was run
    fitted = dict(widget.pattern_result) if widget.pattern_result else None
    if fitted:
        for k in FIT_ARRAYS:
            if fitted.get(k) is not None:
                fitted[k] = base64.b64encode(fitted[k]).decode()
    state["pattern_result"] = fitted
    state.update(compare_state(widget))  # the compare panel (.compare), arrays as base64
    esm = gzip.compress((STATIC / "widget.js").read_bytes(), mtime=0)
    page = (_TEMPLATE.replace("%TITLE%", html.escape(title))
            .replace("%CSS%", (STATIC / "widget.css").read_text().replace("</", "<\\/"))
            .replace("%STATE%", json.dumps(state).replace("</", "<\\/"))
            .replace("%ESM%", base64.b64encode(esm).decode()))
    return page


_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%TITLE%</title>
<style>body{margin:16px;font-family:system-ui,sans-serif}%CSS%</style></head>
<body><div id="lw-root"></div>
<script type="application/json" id="lw-state">%STATE%</script>
<script type="module">
const state = JSON.parse(document.getElementById("lw-state").textContent);
const bytes = (b64) => Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
for (const [key, names] of [["result", ["x", "y", "loss", "accuracy"]],
  ["pattern_result", ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]]]) {
  const r = state[key];
  if (!r) continue;
  for (const k of names) if (r[k] != null) r[k] = new DataView(bytes(r[k]).buffer);
}
const listeners = {};
const model = {
  get: (k) => state[k],
  set: (k, v) => { state[k] = v; for (const f of listeners["change:" + k] || []) f(); },
  save_changes() {},
  send() {},
  on(ev, f) { (listeners[ev] = listeners[ev] || []).push(f); },
  off(ev, f) { listeners[ev] = (listeners[ev] || []).filter((g) => g !== f); },
};
const gz = new Blob([bytes("%ESM%")]).stream().pipeThrough(new DecompressionStream("gzip"));
const src = await new Response(gz).text();
const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
const widget = (await import(url)).default;
widget.render({ model, el: document.getElementById("lw-root") });
</script></body></html>
"""
