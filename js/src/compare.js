// The compare panel: the surfaces of the widget's named models, of any architectures
// (LandscapeWidget(models={"resnet56": a, "resnet56-noshort": b})), on the same axes and
// one colour scale, toggled or side by side, with each one's landscape statistics.
//
// "Compare" sends {kind: "compare", id, names}; "Stop" sends {kind: "compare_stop", id}
// (the kernel validates both: landscape_widget/widget/compare.py). The kernel computes each
// model along its own random directions and writes `compare_result` (axes, float32 loss per
// model, the shared zmin/zmax, the statistics) after every model, and `compare_status`.
// The view controls are traits too (`compare_layout`: "toggle" | "side", `compare_shown`),
// so Python sets them and a re-render or a static export keeps them. Every plot uses the
// same contour levels (start, end, size from the shared range): one colour means one loss.
import Plotly from "./plotly.js";
import { f32 } from "./grid.js";
import { hostTheme, PLOT_CONFIG, themedLayout } from "./theme.js";
import "./compare.css";

const LEVELS = 24; // contour levels over the shared range
const STAT_COLUMNS = [
  ["nonconvex_fraction", "non-convex", (v) => `${(100 * v).toFixed(0)} %`],
  ["minima", "minima", (v) => String(v)],
  ["roughness", "roughness", (v) => v.toFixed(2)],
  ["basin_radius", "basin radius", (v) => v.toPrecision(3)],
];

/** A float32 array of a buffer from the kernel, or of base64 text (static HTML export). */
function floats(buf) {
  return f32(typeof buf === "string" ? Uint8Array.from(atob(buf), (ch) => ch.charCodeAt(0)) : buf);
}

/** The z values and range shown: log10 of the loss when `log` (and the range is positive). */
export function scaled(values, zmin, zmax, log) {
  if (!log || !(zmin > 0)) return { z: values, lo: zmin, hi: zmax, log: false };
  return { z: Array.from(values, (v) => (v > 0 ? Math.log10(v) : NaN)), lo: Math.log10(zmin),
    hi: Math.log10(zmax), log: true };
}

/**
 * The compare panel.
 *
 * @param {object} p
 * @param {object} p.model the anywidget model
 * @param {() => boolean} p.offline whether no kernel is behind the view (Compare off)
 */
export function comparePanel({ model, h, row, newId, offline }) {
  const c = {
    choose: h("span", { class: "lw-compare-choose" }),
    run: h("button", { class: "lw-compare-run" }, "Compare"),
    stop: h("button", { class: "lw-compare-stop" }, "Stop"),
    layout: h("select", { class: "lw-compare-layout", "aria-label": "Layout of the surfaces" }),
    shown: h("span", { class: "lw-compare-shown", role: "radiogroup", "aria-label": "Surface shown" }),
    log: h("input", { type: "checkbox", checked: true, "aria-label": "log10 colour scale" }),
  };
  c.layout.replaceChildren(h("option", { value: "toggle" }, "toggle"),
    h("option", { value: "side" }, "side by side"));
  const plot = h("div", { class: "lw-compare-plot" });
  const table = h("table", { class: "lw-compare-stats" });
  const status = h("div", { class: "lw-compare-status" });
  const details = h("details", { class: "lw-compare" },
    h("summary", {}, "Compare models: each one's surface on one colour scale"),
    h("div", { class: "lw-compare-body" },
      row("models", c.choose, c.run, c.stop),
      row("layout", c.layout, c.shown, h("span", {}, " log "), c.log),
      plot, table, status));
  let frame = 0;
  let draws = 0;
  let drawnNames = [];
  let lastId = null;

  const names = () => model.get("compare_models") || [];
  const checked = () => [...c.choose.querySelectorAll("input")].filter((i) => i.checked)
    .map((i) => i.value);

  function setTrait(key, value) {
    model.set(key, value);
    model.save_changes();
  }

  function syncControls() {
    const list = names();
    details.style.display = list.length >= 2 ? "" : "none";
    if (c.choose.dataset.names !== JSON.stringify(list)) {
      c.choose.dataset.names = JSON.stringify(list);
      c.choose.replaceChildren(...list.map((n) => h("label", {},
        h("input", { type: "checkbox", value: n, checked: true }), ` ${n} `)));
      c.shown.replaceChildren(...list.map((n) => h("label", {},
        h("input", { type: "radio", name: `lw-shown-${newId()}`, value: n }), ` ${n} `)));
      c.shown.querySelectorAll("input").forEach((i) => i.addEventListener("change", () => {
        if (i.checked) setTrait("compare_shown", i.value);
      }));
    }
    const shown = model.get("compare_shown");
    c.shown.querySelectorAll("input").forEach((i) => { i.checked = i.value === shown; });
    c.layout.value = model.get("compare_layout") || "toggle";
    c.shown.style.display = c.layout.value === "toggle" ? "" : "none";
    const running = (model.get("compare_status") || {}).state === "running";
    c.run.disabled = offline() || running;
    c.stop.disabled = offline() || !running;
  }

  c.run.addEventListener("click", () => {
    const chosen = checked();
    if (!chosen.length) return;
    lastId = newId();
    model.send({ kind: "compare", id: lastId, names: chosen });
  });
  c.stop.addEventListener("click", () => model.send({ kind: "compare_stop", id: newId() }));
  c.layout.addEventListener("change", () => setTrait("compare_layout", c.layout.value));
  c.log.addEventListener("change", () => schedule());

  function showStatus() {
    const s = model.get("compare_status") || {};
    const r = model.get("compare_result");
    const range = r && r.zmin != null ? ` · colour range ${r.zmin.toPrecision(3)} – ${r.zmax.toPrecision(3)}` : "";
    const seed = r ? ` · own random directions (${r.norm}, seed ${r.seed}) per model` : "";
    let text = "";
    if (s.state === "running") text = `computing ${s.model || ""} (${s.done}/${s.total})`;
    else if (s.state === "error") text = `error: ${s.message}`;
    else if (s.state) text = `${s.state}: ${s.done || 0}/${s.total || 0} models`
      + (s.message ? ` · ${s.message}` : "");  // e.g. a model without finite losses
    status.textContent = (offline() ? "(no kernel) " : "") + text + range + seed;
  }

  function drawTable(r) {
    const head = h("tr", {}, h("th", {}, "model"), ...STAT_COLUMNS.map(([, label]) => h("th", {}, label)));
    const rows = (r ? r.names : []).map((n) => {
      const s = (r.stats || {})[n];
      const cells = STAT_COLUMNS.map(([key, , fmt]) => h("td", {},
        !s ? "…" : s[key] == null ? "n/a" : s[key] === "inf" ? "> window" : fmt(s[key])));
      const tr = h("tr", { title: s ? s.summary : "not computed yet" }, h("td", {}, n), ...cells);
      if (n === model.get("compare_shown")) tr.className = "lw-compare-current";
      return tr;
    });
    table.replaceChildren(h("thead", {}, head), h("tbody", {}, ...rows));
  }

  function schedule() { if (!frame) frame = requestAnimationFrame(draw); }

  function draw() {
    frame = 0;
    syncControls();
    showStatus();
    const r = model.get("compare_result");
    drawTable(r);
    const computed = r ? r.computed || [] : [];
    if (!r || !computed.length || r.zmin == null) {
      drawnNames = [];
      Plotly.purge(plot);
      return;
    }
    const x = Array.from(floats(r.x));
    const y = Array.from(floats(r.y));
    const [ny, nx] = r.shape;
    const side = (model.get("compare_layout") || "toggle") === "side";
    let show = side ? computed : [model.get("compare_shown")].filter((n) => computed.includes(n));
    if (!show.length) show = [computed[0]];
    const theme = hostTheme(plot);
    const data = show.map((n, k) => {
      const flat = floats(r.loss[n]);
      const s = scaled(flat, r.zmin, r.zmax, c.log.checked);
      const z = [];
      for (let i = 0; i < ny; i++) z.push(Array.from(s.z.slice(i * nx, (i + 1) * nx)));
      return { type: "contour", name: n, x, y, z, coloraxis: "coloraxis",
        autocontour: false, contours: { start: s.lo, end: s.hi, size: (s.hi - s.lo) / LEVELS || 1 },
        xaxis: k ? `x${k + 1}` : "x", yaxis: k ? `y${k + 1}` : "y",
        hovertemplate: `${n}<br>α %{x:.3f}<br>β %{y:.3f}<br>${s.log ? "log10 loss" : "loss"} %{z:.4g}<extra></extra>` };
    });
    const s0 = scaled([], r.zmin, r.zmax, c.log.checked);
    const layout = {
      height: 360, margin: { l: 50, r: 10, t: 30, b: 40 },
      coloraxis: { cmin: s0.lo, cmax: s0.hi, colorscale: "Viridis",
        colorbar: { title: { text: s0.log ? "log10 loss" : "loss" } } },
      grid: { rows: 1, columns: show.length, pattern: "independent" },
      annotations: show.map((n, k) => ({ text: n, showarrow: false, xref: `x${k ? k + 1 : ""} domain`,
        yref: `y${k ? k + 1 : ""} domain`, x: 0.5, y: 1.08, xanchor: "center" })),
    };
    show.forEach((_, k) => {
      const s = k ? String(k + 1) : "";
      // Same axes for every surface: one window, matched zoom.
      layout[`xaxis${s}`] = { title: { text: "α" }, range: [x[0], x[x.length - 1]], ...(k ? { matches: "x" } : {}) };
      layout[`yaxis${s}`] = { title: { text: k ? "" : "β" }, range: [y[0], y[y.length - 1]], ...(k ? { matches: "y" } : {}) };
    });
    drawnNames = show;
    Promise.resolve(Plotly.react(plot, data, themedLayout(theme, layout), { ...PLOT_CONFIG }))
      .then(() => { draws += 1; })
      .catch((err) => { status.textContent = `plot error: ${err}`; });
  }

  const traits = ["compare_models", "compare_result", "compare_status", "compare_layout", "compare_shown"];
  for (const k of traits) model.on(`change:${k}`, schedule);
  schedule();

  return {
    node: details,
    redraw: schedule,
    sync: schedule,
    /** Read-only state for tests: what the plot shows and the shared range. */
    snapshot: () => {
      const r = model.get("compare_result");
      return { shown: [...drawnNames], draws, lastId, layout: model.get("compare_layout"),
        zmin: r ? r.zmin : null, zmax: r ? r.zmax : null, computed: r ? r.computed : [],
        status: status.textContent, open: details.open,
        traces: (plot.data || []).map((t) => ({ name: t.name, zrange: [t.contours.start, t.contours.end] })) };
    },
    dispose() {
      if (frame) cancelAnimationFrame(frame);
      for (const k of traits) model.off(`change:${k}`, schedule);
      Plotly.purge(plot);
    },
  };
}
