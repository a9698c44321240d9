// landscape_widget front end: an anywidget ESM module.
//
// Controls write traits at once; the kernel debounces them (once, in Python: it validates
// every update and decides when to compute) and recomputes when a compute trait changes.
// The compute traits' names, enumerations and limits come from the read-only
// `_spec_schema` trait (written once in landscape_widget/widget/spec.py). Tiles arrive as custom messages with float32 buffers and fill a Float32Array;
// the plot is redrawn with Plotly.react at most once per animation frame, with a constant
// uirevision (zoom and camera survive) and a bumped datarevision. The finished grid also
// lives in the `result` trait, so a re-render, a second view or a static HTML export
// shows it without a kernel.
//
// The pieces: controls.js (the control panel), job.js (a job's grid), plot.js (the
// figure), status.js (the status line), pattern.js (the pattern editor), theme.js (the
// host's colours and the plotly config).
//
// A view with no kernel behind it (a static HTML export, or a view restored from saved
// widget state with no kernel or a new one) cannot compute: its compute controls are
// disabled and the status line says why. A restored view is recognised by silence: the
// kernel answers the `sync` message every view sends (and sends status and results); with
// no word from it within KERNEL_WAIT_MS the view goes offline, and any later word from a
// kernel brings it back.
import Plotly from "./plotly.js";
import { comparePanel } from "./compare.js";
import { controlPanel } from "./controls.js";
import { h, newId, row } from "./dom.js";
import { applyTile, knownCount, newJob, resultJob } from "./job.js";
import { patternPanel } from "./pattern.js";
import { figure, react } from "./plot.js";
import { showStatus as paintStatus } from "./status.js";
import { hostTheme, onThemeChange } from "./theme.js";
import "./widget.css";

const DISPLAY_KEYS = ["metric", "log_scale", "view", "direction_types"];
const TIMINGS_KEPT = 50;
const KERNEL_WAIT_MS = 2500;
export const OFFLINE = {
  static: "Static HTML export: no kernel, so nothing can be computed here (metric, log scale and view still work).",
  restored: "No answer from a kernel: this view was restored from saved widget state, the kernel "
    + "restarted, or it is busy. Compute, the controls and Fit are off until a kernel answers: "
    + "run the cell again to compute.",
};

function render({ model, el }) {
  const get = (k) => model.get(k);
  const computeKeys = () => (model.get("_spec_schema") || {}).fields || [];
  // Why this view cannot compute (OFFLINE.static / OFFLINE.restored), or null when it can.
  let offline = model.get("_static") ? OFFLINE.static : null;
  const panel = controlPanel({ model, get, setTrait, onCompute: compute, onCancel: cancel,
    offline: () => !!offline });
  const plot = h("div", { class: "lw-plot" });
  const bar = h("div", { class: "lw-bar" });
  const status = h("div", { class: "lw-status" });
  const pattern = patternPanel({ model, h, row, newId, offline: () => !!offline });
  const compare = comparePanel({ model, h, row, newId, offline: () => !!offline });
  const root = h("div", { class: "lw-root" }, panel.node,
    h("div", { class: "lw-main" }, plot, h("div", { class: "lw-progress" }, bar), status),
    pattern.node, compare.node);
  el.replaceChildren(root);

  // Keys stay in the widget: in JupyterLab and Notebook 7 an arrow key, space or a letter
  // in command mode is a notebook shortcut (→ on the slider would select the next cell,
  // and the slider would not move). Lumino skips shortcuts for targets inside
  // [data-lm-suppress-shortcuts], but Notebook 7 listens on the document in the capture
  // phase and still swallows them; so a key aimed at this widget is stopped on its way
  // down, at the window (its default action, moving the slider, still happens), and the
  // widget's own key handling (the pattern canvas) is called from here. Escape and
  // modified keys (Shift+Enter, Ctrl+S) still reach the host.
  root.setAttribute("data-lm-suppress-shortcuts", "true");
  const plainKey = (ev) => !(ev.key === "Escape" || ev.ctrlKey || ev.metaKey || ev.altKey
    || (ev.shiftKey && ev.key === "Enter"));
  const keepKeys = (ev) => {
    if (!(ev.target instanceof Node) || !root.contains(ev.target) || !plainKey(ev)) return;
    ev.stopPropagation();
    if (ev.type === "keydown") pattern.onKey(ev);
  };
  for (const type of ["keydown", "keypress", "keyup"]) window.addEventListener(type, keepKeys, true);

  // Read-only hook for tests and for debugging in the browser console:
  // `el.querySelector(".lw-root").landscape()` gives a snapshot of the view's state and the
  // timings (performance.now(), ms) of every computation this view saw: `sent` (the compute
  // message or the control change that asked for it), `start`, `firstTile` (message in) and
  // `firstDraw` (the first tile drawn on screen).
  const timings = {}; // job id -> {source, sent, start, firstTile, firstDraw}
  let lastTraitFlush = null; // performance.now() of the last compute-trait change sent
  let flushedValues = {}; // the compute traits that change set, as JSON: its job's spec
  Object.defineProperty(root, "landscape", { configurable: true, value: () => snapshot() });
  Object.defineProperty(root, "pattern", { configurable: true, value: () => pattern.snapshot() });
  Object.defineProperty(root, "compare", { configurable: true, value: () => compare.snapshot() });

  let job = null; // {id, shape, x, y, metrics, loss, acc, known, complete} (see job.js)
  let live = null; // last progress message of the running job
  let error = null; // last error text
  let revision = 0;
  let frame = 0;
  let plotted = false;
  let drawn = null; // {id, complete} of the job the plot shows (data handed to plotly)

  // --- traits <-> controls -------------------------------------------------------------
  function setTrait(values) {
    // Half-typed numbers (NaN) never reach the kernel; the control shows the trait again.
    const bad = Object.values(values).some((v) => (Array.isArray(v) ? v : [v])
      .some((x) => typeof x === "number" && !Number.isFinite(x)));
    if (bad) {
      panel.sync();
      return;
    }
    const keys = Object.keys(values);
    const changed = keys.filter((k) => computeKeys().includes(k));
    if (changed.length) {
      lastTraitFlush = performance.now();
      flushedValues = Object.fromEntries(changed.map((k) => [k, JSON.stringify(values[k])]));
    }
    for (const k of keys) model.set(k, values[k]);
    model.save_changes();
    panel.sync();
    schedule();
  }

  function spec() {
    return Object.fromEntries(computeKeys().map((k) => [k, get(k)]));
  }

  function timing(id) {
    if (!timings[id]) {
      const ids = Object.keys(timings);
      if (ids.length >= TIMINGS_KEPT) delete timings[ids[0]];
      timings[id] = { source: "kernel", sent: null, start: null, firstTile: null, firstDraw: null };
    }
    return timings[id];
  }

  function compute() {
    const s = spec();
    error = null;
    const id = newId();
    Object.assign(timing(id), { source: "compute", sent: performance.now() });
    lastTraitFlush = null;
    model.send({ kind: "compute", id, spec: s });
  }

  function cancel() {
    model.send({ kind: "cancel", id: job ? job.id : "none" });
  }

  const traitNames = [...computeKeys(), ...DISPLAY_KEYS];
  const onTraits = () => {
    panel.sync();
    schedule();
  };
  for (const k of traitNames) model.on(`change:${k}`, onTraits);
  const onStatus = () => {
    heard();
    showStatus();
  };
  model.on("change:status", onStatus);
  const onResult = () => {
    heard();
    const r = model.get("result");
    if (!r || !r.x) return;
    if (job && !job.complete && job.id !== r.id && !job.ended) return; // a newer job runs
    loadResult(r);
  };
  model.on("change:result", onResult);

  // --- data --------------------------------------------------------------------------
  function loadResult(r) {
    const loaded = resultJob(r);
    // Cancelled before its first tile: keep the picture shown.
    if (!loaded.complete && !knownCount(loaded) && job) return;
    job = loaded;
    schedule();
  }

  let incoming = null; // a started job whose first tile has not arrived (old plot stays)
  function onMessage(msg, buffers) {
    if (!msg || typeof msg !== "object") return;
    heard();
    if (msg.kind === "ready") return;
    if (pattern.onMessage(msg, buffers)) return;
    buffers = buffers || [];
    const now = performance.now();
    if (msg.kind === "start") {
      const t = timing(msg.id);
      // Only the job for the controls' latest values answers their change: a start for a
      // value the slider passed through (or a job begun before) arriving first would
      // otherwise take the change's time, and the real job would count as the kernel's.
      const spec = msg.spec || {};
      const answers = Object.entries(flushedValues)
        .every(([k, v]) => JSON.stringify(spec[k]) === v);
      if (t.sent == null && lastTraitFlush != null && answers) {
        Object.assign(t, { source: "controls", sent: lastTraitFlush });
        lastTraitFlush = null;
      }
      t.start = now;
      incoming = newJob(msg, buffers);
      live = { id: msg.id, done: 0, total: incoming.known.length, device: msg.device };
      error = null;
    } else if (msg.kind === "tile") {
      const target = incoming && incoming.id === msg.id ? incoming : job;
      if (!target || target.id !== msg.id) return;
      applyTile(target, buffers);
      if (timings[msg.id] && timings[msg.id].firstTile == null) timings[msg.id].firstTile = now;
      if (target === incoming) {
        job = incoming;
        incoming = null;
      }
      schedule();
    } else if (msg.kind === "progress") {
      live = msg;
    } else if (msg.kind === "done" || msg.kind === "cancelled") {
      for (const j of [job, incoming]) {
        if (j && j.id === msg.id) {
          j.ended = true;
          j.complete = msg.kind === "done";
        }
      }
      // Cancelled before its first tile: no tile will come; the old picture stays.
      if (incoming && incoming.id === msg.id && msg.kind === "cancelled") incoming = null;
      live = { ...msg, final: true };
    } else if (msg.kind === "error") {
      error = msg.message || "error";
      if (incoming && incoming.id === msg.id) incoming = null;
    }
    showStatus();
  }
  model.on("msg:custom", onMessage);

  function showStatus() {
    paintStatus(bar, status, { s: model.get("status") || {}, live, job, error, offline });
  }

  // --- a kernel behind this view? ------------------------------------------------------
  function setOffline(reason) {
    if (offline === reason) return;
    offline = reason;
    root.classList.toggle("lw-offline", !!offline);
    panel.sync();
    pattern.sync();
    compare.sync();
    showStatus();
  }
  function heard() {
    clearTimeout(kernelTimer);
    if (offline === OFFLINE.restored) setOffline(null);
  }
  let kernelTimer = null;

  // --- plot --------------------------------------------------------------------------
  function schedule() {
    if (!frame) frame = requestAnimationFrame(draw);
  }

  function draw() {
    frame = 0;
    if (!job) return;
    const theme = hostTheme(root);
    const fig = figure(job, get, theme);
    revision += 1;
    const t = timings[job.id];
    const first = t && t.firstTile != null && t.firstDraw == null;
    react(plot, fig, revision, theme).then(() => {
      // The next frame is the first one painted with this plot.
      if (first) requestAnimationFrame(() => { if (t.firstDraw == null) t.firstDraw = performance.now(); });
    }, (err) => {
      error = `plot: ${err && err.message ? err.message : err}`;
      showStatus();
    });
    plotted = true;
    drawn = { id: job.id, complete: job.complete };
  }

  const resize = new ResizeObserver(() => {
    // A hidden plot (collapsed output, background tab) has no size to resize to.
    if (!plotted || !plot.isConnected || !plot.offsetWidth || !plot.offsetHeight) return;
    Promise.resolve(Plotly.Plots.resize(plot)).catch(() => {});
  });
  resize.observe(plot);

  function snapshot() {
    const j = job;
    return {
      job: j && { id: j.id, shape: [...j.shape], size: j.known.length, tiles: j.tiles,
        known: knownCount(j), complete: j.complete, ended: j.ended,
        curve: j.curve ? j.curve.shape : null },
      incoming: incoming ? incoming.id : null,
      status: status.textContent,
      error,
      draws: revision,
      drawn,
      offline,
      timings: JSON.parse(JSON.stringify(timings)),
    };
  }

  const stopTheme = onThemeChange(() => {
    schedule();
    pattern.redraw();
    compare.redraw();
  });

  panel.sync();
  showStatus();
  const initial = model.get("result");
  if (initial && initial.x) loadResult(initial);
  if (!offline) {
    kernelTimer = setTimeout(() => setOffline(OFFLINE.restored), KERNEL_WAIT_MS);
    try {
      model.send({ kind: "sync", id: newId() });
    } catch (err) { // no comm at all: certainly no kernel
      setOffline(OFFLINE.restored);
    }
  }

  return () => {
    if (frame) cancelAnimationFrame(frame);
    clearTimeout(kernelTimer);
    stopTheme();
    for (const type of ["keydown", "keypress", "keyup"]) window.removeEventListener(type, keepKeys, true);
    resize.disconnect();
    for (const k of traitNames) model.off(`change:${k}`, onTraits);
    model.off("change:status", onStatus);
    model.off("change:result", onResult);
    model.off("msg:custom", onMessage);
    pattern.dispose();
    compare.dispose();
    Plotly.purge(plot);
  };
}

export default { render };
