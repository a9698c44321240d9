// landscape_widget front end: an anywidget ESM module.
//
// Controls write traits (debounced 250 ms); the kernel recomputes when a compute trait
// changes. Tiles arrive as custom messages with float32 buffers and fill a Float32Array;
// the plot is redrawn with Plotly.react at most once per animation frame, with a constant
// uirevision (zoom and camera survive) and a bumped datarevision. The finished grid also
// lives in the `result` trait, so a re-render, a second view or a static HTML export
// shows it without a kernel.
import Plotly from "./plotly.js";
import { f32, fillCoarse, i32, log10, rows } from "./grid.js";
import { patternPanel } from "./pattern.js";
import { MAX_PLANE, marksOnCurve, marksTrace, modelPicker, typeChange } from "./models.js";
import { fixedMode, shapeOverlay, shapeWindow } from "./shapes.js";
import { triangleFigure } from "./triangle.js";
import "./widget.css";

const DEBOUNCE_MS = 250;
const MAX_RES = { "2d": 201, "1d": 1025 };
const COMPUTE_KEYS = ["mode", "direction", "norm", "ignore_biasbn", "x_range", "y_range",
  "resolution", "seed", "bn", "quantity", "vertices"];
const MAX_CURVATURE = 31; // a curvature map costs two Lanczos runs per point
const TIMINGS_KEPT = 50;
const VIEWS = {
  "2d": [["contour", "contour"], ["heatmap", "heatmap"], ["surface", "3D surface"]],
  "1d": [["line", "line"]],
};
const UIREVISION = "landscape";

let counter = 0;
const newId = () => `js-${Date.now().toString(36)}-${++counter}`;

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function options(select, items, value) {
  select.replaceChildren(...items.map(([v, label]) => h("option", { value: v }, label)));
  if (value !== undefined) select.value = value;
}

function fmt(n, digits = 3) {
  if (n == null || !Number.isFinite(n)) return "–";
  return Math.abs(n) >= 1000 ? Math.round(n).toLocaleString() : n.toPrecision(digits);
}

function fmtTime(s) {
  if (s == null || !Number.isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function controls() {
  const c = {
    direction: h("select", { title: "Direction type" }),
    ignore_biasbn: h("input", { type: "checkbox", title: "Zero the direction on biases and BatchNorm" }),
    mode: h("select", { title: "1D curve or 2D surface" }),
    x0: h("input", { type: "number", step: "any" }),
    x1: h("input", { type: "number", step: "any" }),
    y0: h("input", { type: "number", step: "any" }),
    y1: h("input", { type: "number", step: "any" }),
    margin: h("input", { type: "number", step: "any", class: "lw-margin",
      title: "How far beyond the triangle to look: α, β ≥ −margin, α + β ≤ 1 + margin" }),
    resolution: h("input", { type: "range", min: 3, step: 2 }),
    resolutionBox: h("input", { type: "number", min: 2, step: 1 }),
    metric: h("select", { title: "Metric shown" }),
    log_scale: h("input", { type: "checkbox", title: "log10 colour / y scale" }),
    view: h("select", { title: "View" }),
    seed: h("input", { type: "number", min: 0, step: 1 }),
    bn: h("select", { title: "BatchNorm statistics" }),
    quantity: h("select", { title: "What to compute: the loss, or the Hessian's eigenvalue ratio |λmin/λmax| (slow: two Lanczos runs per point)" }),
    compute: h("button", { class: "lw-compute", title: "Compute now" }, "Compute"),
    cancel: h("button", { class: "lw-cancel", title: "Stop the running computation" }, "Cancel"),
  };
  options(c.mode, [["2d", "2D surface"], ["1d", "1D curve"]]);
  options(c.metric, [["loss", "loss"], ["accuracy", "accuracy"]]);
  options(c.bn, [["eval", "BN: running stats"], ["batch", "BN: batch stats"]]);
  options(c.quantity, [["loss", "loss & accuracy"], ["curvature", "curvature |λmin/λmax|"]]);
  return c;
}

function row(label, ...inputs) {
  return h("label", { class: "lw-row" }, h("span", { class: "lw-label" }, label), ...inputs);
}

function render({ model, el }) {
  const c = controls();
  const xRow = row("α range", c.x0, c.x1);
  const yRow = row("β range", c.y0, c.y1);
  const marginRow = row("margin", c.margin);
  const picker = modelPicker({ h, onChange: (vertices) => setTrait({ vertices }) });
  const vertexRow = row("models", picker.node);
  const plane = { before: null }; // the controls the plane replaced (see models.js)
  const panel = h("div", { class: "lw-controls" },
    row("compute", c.quantity),
    row("direction", c.direction),
    vertexRow,
    row("ignore bias+BN", c.ignore_biasbn),
    row("mode", c.mode),
    xRow,
    yRow,
    marginRow,
    row("resolution", c.resolution, c.resolutionBox),
    row("metric", c.metric),
    row("log scale", c.log_scale),
    row("view", c.view),
    row("seed", c.seed),
    row("batch norm", c.bn),
    h("div", { class: "lw-buttons" }, c.compute, c.cancel));
  const plot = h("div", { class: "lw-plot" });
  const bar = h("div", { class: "lw-bar" });
  const status = h("div", { class: "lw-status" });
  const pattern = patternPanel({ model, h, row, newId, isStatic: !!model.get("_static") });
  const root = h("div", { class: "lw-root" }, panel,
    h("div", { class: "lw-main" }, plot, h("div", { class: "lw-progress" }, bar), status),
    pattern.node);
  el.replaceChildren(root);
  if (model.get("_static")) {
    // A static HTML export: no kernel to compute; only the display controls stay live.
    for (const k of ["direction", "ignore_biasbn", "mode", "x0", "x1", "y0", "y1", "resolution",
      "resolutionBox", "seed", "bn", "compute", "cancel", "quantity", "margin"]) c[k].disabled = true;
  }

  // Read-only hook for tests and for debugging in the browser console:
  // `el.querySelector(".lw-root").landscape()` gives a snapshot of the view's state and the
  // timings (performance.now(), ms) of every computation this view saw: `sent` (the compute
  // message or the control change that asked for it), `start`, `firstTile` (message in) and
  // `firstDraw` (the first tile drawn on screen).
  const timings = {}; // job id -> {source, sent, start, firstTile, firstDraw}
  let lastTraitFlush = null; // performance.now() of the last compute-trait change sent
  Object.defineProperty(root, "landscape", { configurable: true, value: () => snapshot() });
  Object.defineProperty(root, "pattern", { configurable: true, value: () => pattern.snapshot() });

  let job = null; // {id, shape, x, y, metrics, loss, acc, known, complete}
  let live = null; // last progress message of the running job
  let error = null; // last error text
  let revision = 0;
  let frame = 0;
  let plotted = false;
  let drawn = null; // {id, complete} of the job the plot shows (data handed to plotly)
  const pending = {};
  let timer = null;

  // --- traits <-> controls -------------------------------------------------------------
  const get = (k) => (k in pending ? pending[k] : model.get(k));

  function flush() {
    clearTimeout(timer);
    timer = null;
    const keys = Object.keys(pending);
    if (!keys.length) return;
    if (keys.some((k) => COMPUTE_KEYS.includes(k))) lastTraitFlush = performance.now();
    for (const k of keys) model.set(k, pending[k]);
    for (const k of keys) delete pending[k];
    model.save_changes();
  }

  function setTrait(values) {
    // Half-typed numbers (NaN) never reach the kernel; the control shows the trait again.
    const bad = Object.values(values).some((v) => (Array.isArray(v) ? v : [v])
      .some((x) => typeof x === "number" && !Number.isFinite(x)));
    if (bad) {
      syncControls();
      return;
    }
    Object.assign(pending, values);
    clearTimeout(timer);
    timer = setTimeout(flush, DEBOUNCE_MS);
    syncControls();
    schedule();
  }

  function directionItems() {
    const types = model.get("direction_types") || [];
    return types.map((t, i) => [String(i), t.label]);
  }

  function syncControls() {
    const types = model.get("direction_types") || [];
    const mode = get("mode");
    let idx = types.findIndex((t) => t.direction === get("direction") && t.norm === get("norm"));
    if (idx < 0) idx = types.findIndex((t) => t.direction === get("direction"));
    options(c.direction, directionItems(), String(Math.max(idx, 0)));
    const isStatic = !!model.get("_static");
    vertexRow.style.display = picker.sync(types[idx], get("vertices"), isStatic) ? "" : "none";
    c.ignore_biasbn.checked = !!get("ignore_biasbn");
    c.mode.value = mode;
    const [x0, x1] = get("x_range");
    const [y0, y1] = get("y_range");
    for (const [input, v] of [[c.x0, x0], [c.x1, x1], [c.y0, y0], [c.y1, y1], [c.margin, -x0]]) {
      if (document.activeElement !== input) input.value = v;
    }
    // The plane has its own lattice: a margin instead of ranges, steps per unit as resolution.
    const isPlane = get("direction") === "plane";
    xRow.style.display = isPlane ? "none" : "";
    yRow.style.display = mode === "2d" && !isPlane ? "" : "none";
    marginRow.style.display = isPlane ? "" : "none";
    const curvature = get("quantity") === "curvature";
    c.quantity.value = get("quantity") || "loss";
    c.quantity.disabled = isStatic || !!(types[idx] && types[idx].count);
    c.mode.disabled = curvature || isPlane || isStatic || fixedMode(types[idx]);
    c.metric.disabled = curvature;
    c.resolution.max = maxRes();
    c.resolution.min = isPlane ? 2 : 3;
    c.resolution.step = isPlane ? 1 : 2;
    c.resolution.title = isPlane ? "Grid steps per unit of α and β" : "Points per axis";
    c.resolutionBox.max = c.resolution.max;
    c.resolution.value = get("resolution");
    if (document.activeElement !== c.resolutionBox) c.resolutionBox.value = get("resolution");
    c.metric.value = get("metric");
    c.log_scale.checked = !!get("log_scale");
    const views = VIEWS[mode] || VIEWS["2d"];
    options(c.view, views, mode === "1d" ? "line" : get("view"));
    c.view.disabled = mode === "1d" || isPlane;
    if (document.activeElement !== c.seed) c.seed.value = get("seed");
    c.bn.value = get("bn");
  }

  const num = (input) => Number.parseFloat(input.value);
  const int = (input) => Number.parseInt(input.value, 10);
  const on = (node, ev, fn) => node.addEventListener(ev, fn);

  on(c.direction, "change", () => {
    const types = model.get("direction_types") || [];
    const t = types[Number(c.direction.value)];
    const current = types.find((e) => e.direction === get("direction"));
    if (t) setTrait({ ...typeChange(t, get, plane), ...shapeWindow(t, current, get) });
  });
  on(c.margin, "change", () => {
    const m = Math.min(Math.max(num(c.margin), 0), 1);
    setTrait({ x_range: [-m, 1 + m], y_range: [-m, 1 + m] });
  });
  on(c.ignore_biasbn, "change", () => setTrait({ ignore_biasbn: c.ignore_biasbn.checked }));
  on(c.mode, "change", () => {
    const mode = c.mode.value;
    const res = Math.min(get("resolution"), MAX_RES[mode]);
    setTrait({ mode, resolution: res });
  });
  for (const input of [c.x0, c.x1]) {
    on(input, "change", () => setTrait({ x_range: [num(c.x0), num(c.x1)] }));
  }
  for (const input of [c.y0, c.y1]) {
    on(input, "change", () => setTrait({ y_range: [num(c.y0), num(c.y1)] }));
  }
  // Out-of-range numbers are clamped here rather than refused by the kernel.
  function maxRes() {
    if (get("direction") === "plane") return MAX_PLANE;
    return get("quantity") === "curvature" ? MAX_CURVATURE : MAX_RES[get("mode")] || 201;
  }
  const clampRes = (n) => (Number.isFinite(n) ? Math.min(Math.max(n, 2), maxRes()) : n);
  on(c.quantity, "change", () => {
    const quantity = c.quantity.value;
    if (quantity === "curvature") {
      setTrait({ quantity, mode: "2d", resolution: Math.min(get("resolution"), 11), view: "heatmap" });
    } else {
      setTrait({ quantity });
    }
  });
  on(c.resolution, "input", () => setTrait({ resolution: clampRes(int(c.resolution)) }));
  on(c.resolutionBox, "change", () => setTrait({ resolution: clampRes(int(c.resolutionBox)) }));
  on(c.metric, "change", () => setTrait({ metric: c.metric.value }));
  on(c.log_scale, "change", () => setTrait({ log_scale: c.log_scale.checked }));
  on(c.view, "change", () => setTrait({ view: c.view.value }));
  on(c.seed, "change", () => {
    const seed = int(c.seed);
    setTrait({ seed: Number.isFinite(seed) ? Math.min(Math.max(seed, 0), 2 ** 31 - 1) : seed });
  });
  on(c.bn, "change", () => setTrait({ bn: c.bn.value }));

  function spec() {
    return Object.fromEntries(COMPUTE_KEYS.map((k) => [k, get(k)]));
  }

  function timing(id) {
    if (!timings[id]) {
      const ids = Object.keys(timings);
      if (ids.length >= TIMINGS_KEPT) delete timings[ids[0]];
      timings[id] = { source: "kernel", sent: null, start: null, firstTile: null, firstDraw: null };
    }
    return timings[id];
  }

  on(c.compute, "click", () => {
    const s = spec();
    flush();
    error = null;
    const id = newId();
    Object.assign(timing(id), { source: "compute", sent: performance.now() });
    lastTraitFlush = null;
    model.send({ kind: "compute", id, spec: s });
  });
  on(c.cancel, "click", () => {
    flush();
    model.send({ kind: "cancel", id: job ? job.id : "none" });
  });

  const traitNames = ["mode", "direction", "norm", "ignore_biasbn", "x_range", "y_range",
    "resolution", "seed", "bn", "quantity", "vertices", "metric", "log_scale", "view",
    "direction_types"];
  const onTraits = () => {
    syncControls();
    schedule();
  };
  for (const k of traitNames) model.on(`change:${k}`, onTraits);
  const onStatus = () => showStatus();
  model.on("change:status", onStatus);
  const onResult = () => {
    const r = model.get("result");
    if (!r || !r.x) return;
    if (job && !job.complete && job.id !== r.id && !job.ended) return; // a newer job runs
    loadResult(r);
  };
  model.on("change:result", onResult);

  // --- data --------------------------------------------------------------------------
  function newJob(msg, buffers) {
    const size = msg.shape.reduce((a, b) => a * b, 1);
    const loss = new Float32Array(size).fill(NaN);
    return {
      id: msg.id, shape: msg.shape, metrics: msg.metrics || ["loss"], device: msg.device,
      x: f32(buffers[0]), y: msg.shape.length === 2 ? f32(buffers[1]) : null,
      loss, acc: Float32Array.from(loss), known: new Uint8Array(size),
      complete: false, ended: false, tiles: 0,
      path: msg.path || null, labels: msg.labels || null, label: msg.label || null,
      marks: msg.marks || null, plane: msg.plane || null, curve: null,
    };
  }

  function loadResult(r) {
    const size = r.shape.reduce((a, b) => a * b, 1);
    const loaded = {
      id: r.id, shape: r.shape, metrics: r.metrics || ["loss"], device: r.device,
      x: f32(r.x), y: r.shape.length === 2 ? f32(r.y) : null,
      loss: r.loss ? f32(r.loss) : new Float32Array(size).fill(NaN),
      acc: r.accuracy ? f32(r.accuracy) : new Float32Array(size).fill(NaN),
      known: new Uint8Array(size).fill(1), complete: !!r.complete, ended: true, tiles: 1,
      path: r.path || null, labels: r.labels || null, label: r.label || null,
      marks: r.marks || null, plane: r.plane || null, curve: r.curve || null,
    };
    if (!loaded.complete) {
      // A cancelled result: NaN marks points never computed, which the display fills in.
      const first = loaded.metrics.includes("loss") ? loaded.loss : loaded.acc;
      let known = 0;
      for (let k = 0; k < size; k++) known += loaded.known[k] = Number.isNaN(first[k]) ? 0 : 1;
      if (!known && job) return; // cancelled before its first tile: keep the picture shown
    }
    job = loaded;
    schedule();
  }

  let incoming = null; // a started job whose first tile has not arrived (old plot stays)
  function onMessage(msg, buffers) {
    if (!msg || typeof msg !== "object") return;
    if (pattern.onMessage(msg, buffers)) return;
    buffers = buffers || [];
    const now = performance.now();
    if (msg.kind === "start") {
      const t = timing(msg.id);
      if (t.sent == null && lastTraitFlush != null) Object.assign(t, { source: "controls", sent: lastTraitFlush });
      lastTraitFlush = null;
      t.start = now;
      incoming = newJob(msg, buffers);
      live = { id: msg.id, done: 0, total: incoming.known.length, device: msg.device };
      error = null;
    } else if (msg.kind === "tile") {
      const target = incoming && incoming.id === msg.id ? incoming : job;
      if (!target || target.id !== msg.id) return;
      const flat = i32(buffers[0]);
      const lo = f32(buffers[1]);
      const ac = f32(buffers[2]);
      for (let i = 0; i < flat.length; i++) {
        const k = flat[i];
        if (k < 0 || k >= target.known.length) continue;
        if (lo.length) target.loss[k] = lo[i];
        if (ac.length) target.acc[k] = ac[i];
        target.known[k] = 1;
      }
      target.tiles += 1;
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

  // --- status ------------------------------------------------------------------------
  function showStatus() {
    const s = model.get("status") || {};
    const parts = [];
    let pct = 0;
    // The status trait of a job that has sent no grid yet (mining a direction, Hessian
    // eigenvectors, an error before its start) is newer than the last job's messages.
    const stale = live && s.id && live.id !== s.id;
    if (stale) {
      pct = s.total ? (100 * s.done) / s.total : 0;
      parts.push(s.state, s.device || "");
      if (s.state === "running" && s.eta_s != null) parts.push(`ETA ${fmtTime(s.eta_s)}`);
      if (s.message && s.state !== "error") parts.push(s.message);
    } else if (live && !live.final && live.total) {
      pct = (100 * live.done) / live.total;
      parts.push(live.device || s.device || "", `${fmt(live.points_per_s)} pts/s`,
        `${pct.toFixed(0)} %`, `ETA ${fmtTime(live.eta_s)}`);
      if (live.plan) parts.push(live.plan);
    } else if (live && live.kind === "done") {
      pct = 100;
      parts.push(`done: ${live.evaluated} evaluated, ${live.reused} reused in ${fmtTime(live.seconds)}`,
        (job && job.device) || s.device || "");
      if (live.nonfinite) parts.push(`${live.nonfinite} non-finite`);
    } else if (live && live.kind === "cancelled") {
      pct = live.total ? (100 * live.done) / live.total : 0;
      parts.push(`cancelled at ${pct.toFixed(0)} %`);
    } else if (s.state) {
      pct = s.total ? (100 * s.done) / s.total : 0;
      parts.push(s.state, s.device || "");
      if (s.state === "running") parts.push(`${fmt(s.points_per_s)} pts/s`, `ETA ${fmtTime(s.eta_s)}`);
      if (s.message && s.state !== "error") parts.push(s.message);
    }
    bar.style.width = `${Math.min(100, pct)}%`;
    const text = parts.filter(Boolean).join(" · ");
    const err = error || (s.state === "error" ? s.message : null);
    status.replaceChildren(h("span", {}, text), ...(err ? [h("span", { class: "lw-error" }, ` ${err}`)] : []));
  }

  // --- plot --------------------------------------------------------------------------
  function schedule() {
    if (!frame) frame = requestAnimationFrame(draw);
  }

  function figure() {
    const metric = get("metric") === "accuracy" && job.metrics.includes("accuracy") ? "accuracy" : "loss";
    const raw = metric === "accuracy" ? job.acc : job.loss;
    const log = !!get("log_scale");
    const values = job.complete ? raw : fillCoarse(raw, job.known, job.shape);
    const label = job.label || metric;
    const [xTitle, yTitle] = job.labels || ["α", "β"];
    if (job.shape.length === 1) {
      const shape = shapeOverlay(job.complete ? job.curve : null, metric);
      return {
        data: [{ type: "scatter", mode: "lines+markers", marker: { size: 3 }, name: label,
          showlegend: false, x: Array.from(job.x), y: Array.from(values),
          hovertemplate: `α=%{x:.4g}<br>${label}=%{y:.5g}<extra></extra>` },
        ...(job.marks ? [marksOnCurve(job.marks, job.x, values)] : []), ...shape.data],
        layout: { xaxis: { title: { text: xTitle } }, annotations: shape.annotations,
          yaxis: { title: { text: label }, type: log ? "log" : "linear" } },
      };
    }
    if (job.plane) {
      return triangleFigure({ a: job.x, b: job.y, values, plane: job.plane, label, log });
    }
    const [ny, nx] = job.shape;
    const z = rows(log ? log10(values) : values, ny, nx);
    const title = (log ? "log10 " : "") + label;
    const view = get("view");
    const curvature = !!job.label;
    const trace = { x: Array.from(job.x), y: Array.from(job.y), z, colorscale: "Viridis",
      colorbar: { title: { text: title } },
      ...(curvature && !log ? { zmin: 0, zmax: 0.5 } : {}),
      hovertemplate: `α=%{x:.4g}<br>β=%{y:.4g}<br>${title}=%{z:.5g}<extra></extra>` };
    if (view === "surface") {
      return {
        data: [{ ...trace, type: "surface" }],
        layout: { scene: { uirevision: UIREVISION, xaxis: { title: { text: xTitle } },
          yaxis: { title: { text: yTitle } }, zaxis: { title: { text: title } } } },
      };
    }
    const main = view === "heatmap"
      ? { ...trace, type: "heatmap", hoverongaps: false }
      : { ...trace, type: "contour", contours: { coloring: "heatmap" }, connectgaps: false };
    const marker = job.marks ? marksTrace(job.marks) : { type: "scatter", x: [0], y: [0],
      mode: "markers", name: "θ", showlegend: false, marker: { symbol: "x", color: "red", size: 9 },
      hovertemplate: "θ (the model)<extra></extra>" };
    const extra = [];
    if (job.path && job.path.length && job.path[0].length >= 2) {
      extra.push({ type: "scatter", mode: "lines+markers", name: "training path", showlegend: false,
        x: job.path.map((p) => p[0]), y: job.path.map((p) => p[1]),
        line: { color: "white", width: 2 }, marker: { size: 5, color: "white", line: { color: "black", width: 1 } },
        hovertemplate: "checkpoint %{pointNumber}<extra>path</extra>" });
    }
    return {
      data: [main, ...extra, marker],
      layout: { xaxis: { title: { text: xTitle } }, yaxis: { title: { text: yTitle } } },
    };
  }

  function draw() {
    frame = 0;
    if (!job) return;
    const fig = figure();
    revision += 1;
    // The triangle brings its own uirevision: a zoom on a grid must not carry over to it.
    const layout = { uirevision: UIREVISION, ...fig.layout, datarevision: revision,
      margin: { l: 55, r: 10, t: 20, b: 45 }, autosize: true };
    const config = { displaylogo: false, responsive: false };
    const t = timings[job.id];
    const first = t && t.firstTile != null && t.firstDraw == null;
    Promise.resolve(Plotly.react(plot, fig.data, layout, config)).then(() => {
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
        known: j.known.reduce((a, b) => a + b, 0), complete: j.complete, ended: j.ended,
        curve: j.curve ? j.curve.shape : null },
      incoming: incoming ? incoming.id : null,
      status: status.textContent,
      error,
      draws: revision,
      drawn,
      timings: JSON.parse(JSON.stringify(timings)),
    };
  }

  syncControls();
  showStatus();
  const initial = model.get("result");
  if (initial && initial.x) loadResult(initial);
  model.send({ kind: "sync", id: newId() });

  return () => {
    flush();
    if (frame) cancelAnimationFrame(frame);
    resize.disconnect();
    for (const k of traitNames) model.off(`change:${k}`, onTraits);
    model.off("change:status", onStatus);
    model.off("change:result", onResult);
    model.off("msg:custom", onMessage);
    pattern.dispose();
    Plotly.purge(plot);
  };
}

export default { render };
