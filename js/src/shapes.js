// Curve shapes (Li, Li & Zhan 2024): the label and extrema of a 1D loss curve, and the
// windows of the curve-shape direction types (landscape_widget/widget/shapes.py).
//
// The kernel classifies every complete 1D loss curve and sends {shape, reason, extrema}
// in the `result` trait, so the label is drawn once the last point is in (a curve still
// streaming or cancelled has none: its gaps could change the label).

const COLOURS = { min: "#2ca02c", max: "#d62728" };
const SYMBOLS = { min: "triangle-up", max: "triangle-down" };
const NAMES = { min: "minima", max: "maxima" };
const ONE = { min: "minimum", max: "maximum" };

/**
 * Trait values for a switch to direction entry `entry` from entry `current`.
 *
 * Entries of the curve-shape types carry `shape` ("curve" or "surface") and `window`
 * ([start, stop, num], the taxonomy window for curves). Entering a kind sets its window
 * (curves are 1D loss curves; planes are 2D, `num` applies when coming from 1D); moving
 * between types of one kind keeps a window the user changed, and otherwise takes the new
 * type's window (the permutation's is theta and its twin, not the taxonomy window).
 */
export function shapeWindow(entry, current, get) {
  if (!entry || !entry.window) return {};
  const [x0, x1, n] = entry.window;
  if (current && current.shape === entry.shape) {
    // Same kind: keep a window the user changed; follow the new type's own window (the
    // permutation's differs from the taxonomy window) while the current one is untouched.
    const w = current.window;
    const xr = get("x_range") || [];
    const untouched = !!w && xr[0] === w[0] && xr[1] === w[1] && get("resolution") === w[2];
    const same = !!w && w[0] === x0 && w[1] === x1 && w[2] === n;
    if (!untouched || same || entry.shape === "surface") return {};
  }
  if (entry.shape === "surface") {
    const out = { mode: "2d", x_range: [x0, x1], y_range: [x0, x1] };
    if (get("mode") !== "2d") out.resolution = n;
    return out;
  }
  return { mode: "1d", quantity: "loss", x_range: [x0, x1], resolution: n };
}

/** Whether entry `entry` fixes the mode (the mined planes are 2D only). */
export function fixedMode(entry) {
  return !!entry && entry.shape === "surface";
}

function fmt(n) {
  return Number.isFinite(n) ? n.toPrecision(3) : "–";
}

/**
 * Plotly traces (markers on the minima and maxima) and the annotation (the label, its
 * reason on hover) of a classified curve; nothing for the accuracy view, whose values
 * the loss extrema do not mark.
 */
export function shapeOverlay(curve, metric) {
  if (!curve || metric !== "loss") return { data: [], annotations: [] };
  const extrema = curve.extrema || [];
  const data = ["min", "max"].map((kind) => {
    const list = extrema.filter((e) => e.kind === kind);
    return { type: "scatter", mode: "markers", name: NAMES[kind], showlegend: false,
      x: list.map((e) => e.alpha), y: list.map((e) => e.loss),
      text: list.map((e) => `prominence ${fmt(e.prominence)}${e.edge ? " (at the window's edge)" : ""}`),
      marker: { symbol: SYMBOLS[kind], size: 11, color: COLOURS[kind], line: { color: "black", width: 1 } },
      hovertemplate: `${ONE[kind]} α=%{x:.4g}<br>loss=%{y:.5g}<br>%{text}<extra></extra>` };
  }).filter((t) => t.x.length);
  const annotations = [{ name: "curve shape", xref: "paper", yref: "paper", x: 0.01, y: 0.99,
    xanchor: "left", yanchor: "top", showarrow: false, text: `<b>${curve.shape}</b>`,
    hovertext: curve.reason || curve.shape, bgcolor: "rgba(255,255,255,0.85)",
    bordercolor: "#888", borderwidth: 1, borderpad: 3 }];
  return { data, annotations };
}
