// The control panel: one input per trait. `sync()` shows the traits (through `get`); a
// change goes back through `setTrait` (the kernel debounces it). Numbers out of range are
// clamped here, to the limits of the `_spec_schema` trait (the kernel's, written once in
// landscape_widget/widget/spec.py), rather than refused by the kernel.
import { h, options, row } from "./dom.js";
import { modelPicker, typeChange } from "./models.js";
import { fixedMode, shapeWindow } from "./shapes.js";

const VIEWS = {
  "2d": [["contour", "contour"], ["heatmap", "heatmap"], ["surface", "3D surface"]],
  "1d": [["line", "line"]],
};
// A view with no kernel (a static HTML export, a restored view) cannot compute: only the
// display controls stay live.
const COMPUTE_ONLY = ["direction", "ignore_biasbn", "mode", "x0", "x1", "y0", "y1", "resolution",
  "resolutionBox", "seed", "bn", "compute", "cancel", "quantity", "margin", "precision", "samples"];

function controls() {
  const c = {
    direction: h("select", { title: "Direction type" }),
    ignore_biasbn: h("input", { type: "checkbox", title: "Zero the direction on biases and BatchNorm" }),
    mode: h("select", { title: "1D curve or 2D surface" }),
    // Every input has its own accessible name: a row's <label> names only its first input.
    x0: h("input", { type: "number", step: "any", "aria-label": "α from" }),
    x1: h("input", { type: "number", step: "any", "aria-label": "α to" }),
    y0: h("input", { type: "number", step: "any", "aria-label": "β from" }),
    y1: h("input", { type: "number", step: "any", "aria-label": "β to" }),
    margin: h("input", { type: "number", step: "any", class: "lw-margin",
      title: "How far beyond the triangle to look: α, β ≥ −margin, α + β ≤ 1 + margin" }),
    resolution: h("input", { type: "range", min: 3, step: 2, "aria-label": "resolution" }),
    resolutionBox: h("input", { type: "number", min: 2, step: 1, "aria-label": "resolution (number)" }),
    metric: h("select", { title: "Metric shown" }),
    log_scale: h("input", { type: "checkbox", title: "log10 colour / y scale" }),
    view: h("select", { title: "View" }),
    seed: h("input", { type: "number", min: 0, step: 1 }),
    bn: h("select", { title: "BatchNorm statistics" }),
    precision: h("select", { title: "Compute precision: fp32 is exact; tf32 and fp16 need a GPU, bf16 is approximate (the result reports its measured error)" }),
    samples: h("select", { title: "Data per point: auto draws a random subset first on large data (labelled, ± standard error), then all data; exact uses all data only; a subset size stops there (the result is that subset's estimate, with its standard error; a curvature map is computed on that subset too)" }),
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

/**
 * The control panel of the widget.
 *
 * @param {object} p
 * @param {object} p.model the anywidget model (direction_types, _spec_schema, _static)
 * @param {(k: string) => any} p.get a trait's value, the pending one if any
 * @param {(values: object) => void} p.setTrait write traits (debounced)
 * @param {() => void} p.onCompute the Compute button
 * @param {() => void} p.onCancel the Cancel button
 * @param {() => boolean} p.offline whether no kernel is behind the view (compute controls off)
 * @returns {{node: HTMLElement, sync: () => void}}
 */
export function controlPanel({ model, get, setTrait, onCompute, onCancel, offline }) {
  const c = controls();
  // The precisions are the kernel's enumeration (spec.py); the labels say where each runs.
  const precisionLabels = { fp32: "fp32 (exact)", tf32: "tf32 (GPU)", fp16: "fp16 (GPU)" };
  options(c.precision, ((model.get("_spec_schema") || {}).choices?.precision || ["fp32"])
    .map((v) => [v, precisionLabels[v] || v]));
  // The data-subset modes are the kernel's enumeration too (core/progressive.py).
  const sampleLabels = { auto: "auto (subset first)", exact: "all (exact)" };
  options(c.samples, ((model.get("_spec_schema") || {}).choices?.samples || ["auto"])
    .map((v) => [v, sampleLabels[v] || `subset ${v} (± se)`]));
  const xRow = row("α range", c.x0, c.x1);
  const yRow = row("β range", c.y0, c.y1);
  const marginRow = row("margin", c.margin);
  const picker = modelPicker({ h, onChange: (vertices) => setTrait({ vertices }) });
  const vertexRow = row("models", picker.node);
  const plane = { before: null }; // the controls the plane replaced (see models.js)
  const node = h("div", { class: "lw-controls" },
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
    row("precision", c.precision),
    row("samples", c.samples),
    h("div", { class: "lw-buttons" }, c.compute, c.cancel));

  function directionItems() {
    const types = model.get("direction_types") || [];
    return types.map((t, i) => [String(i), t.label]);
  }

  function sync() {
    const types = model.get("direction_types") || [];
    const mode = get("mode");
    let idx = types.findIndex((t) => t.direction === get("direction") && t.norm === get("norm"));
    if (idx < 0) idx = types.findIndex((t) => t.direction === get("direction"));
    options(c.direction, directionItems(), String(Math.max(idx, 0)));
    const noKernel = offline();
    for (const k of COMPUTE_ONLY) c[k].disabled = noKernel;
    vertexRow.style.display = picker.sync(types[idx], get("vertices"), noKernel) ? "" : "none";
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
    c.quantity.disabled = noKernel || !!(types[idx] && types[idx].count);
    c.mode.disabled = curvature || isPlane || noKernel || fixedMode(types[idx]);
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
    // Accuracy lives in [0, 1]: the log scale is for the loss (plot.js ignores it there).
    c.log_scale.disabled = get("metric") === "accuracy" && !curvature;
    const views = VIEWS[mode] || VIEWS["2d"];
    options(c.view, views, mode === "1d" ? "line" : get("view"));
    c.view.disabled = mode === "1d" || isPlane;
    if (document.activeElement !== c.seed) c.seed.value = get("seed");
    c.bn.value = get("bn");
    c.precision.value = get("precision") || "fp32";
    c.samples.value = get("samples") || "auto";
  }

  const num = (input) => Number.parseFloat(input.value);
  const int = (input) => Number.parseInt(input.value, 10);
  const on = (el, ev, fn) => el.addEventListener(ev, fn);

  on(c.direction, "change", () => {
    const types = model.get("direction_types") || [];
    const t = types[Number(c.direction.value)];
    const current = types.find((e) => e.direction === get("direction"));
    if (t) setTrait({ ...typeChange(t, get, plane, schema()), ...shapeWindow(t, current, get) });
  });
  on(c.margin, "change", () => {
    const m = Math.min(Math.max(num(c.margin), 0), 1);
    setTrait({ x_range: [-m, 1 + m], y_range: [-m, 1 + m] });
  });
  on(c.ignore_biasbn, "change", () => setTrait({ ignore_biasbn: c.ignore_biasbn.checked }));
  on(c.mode, "change", () => {
    const mode = c.mode.value;
    const res = Math.min(get("resolution"), schema().resolution[mode]);
    setTrait({ mode, resolution: res });
  });
  for (const input of [c.x0, c.x1]) {
    on(input, "change", () => setTrait({ x_range: [num(c.x0), num(c.x1)] }));
  }
  for (const input of [c.y0, c.y1]) {
    on(input, "change", () => setTrait({ y_range: [num(c.y0), num(c.y1)] }));
  }
  // The kernel's limits: {fields, defaults, choices, limits, resolution} (see spec.py).
  const schema = () => model.get("_spec_schema");
  function maxRes() {
    const caps = schema().resolution;
    if (get("direction") === "plane") return caps.plane;
    // A curvature map costs two Lanczos runs per point: its cap is far lower.
    return get("quantity") === "curvature" ? caps.curvature : caps[get("mode")] || caps["2d"];
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
    const [low, high] = schema().limits.seed;
    setTrait({ seed: Number.isFinite(seed) ? Math.min(Math.max(seed, low), high) : seed });
  });
  on(c.bn, "change", () => setTrait({ bn: c.bn.value }));
  on(c.precision, "change", () => setTrait({ precision: c.precision.value }));
  on(c.samples, "change", () => setTrait({ samples: c.samples.value }));
  on(c.compute, "click", () => onCompute());
  on(c.cancel, "click", () => onCancel());

  return { node, sync };
}
