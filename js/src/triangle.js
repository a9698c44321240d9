// The plane through three models, drawn on an equilateral triangle: the front-end twin of
// `triangle_traces` in landscape_widget/experiments/triangle.py (same corners, carpet,
// contours, a mask in the background colour over the corner beyond the region, outline, named models).
import { log10, rows } from "./grid.js";

const H = Math.sqrt(3) / 2;
// The first model right, the second on top, the third at the origin (as CORNERS in Python).
const CORNERS = [[1, 0], [0.5, H], [0, 0]];
const POSITIONS = ["bottom center", "top center", "bottom center"];
const CARPET = "plane";

// alpha * corner 1 + beta * corner 2 + (1 - alpha - beta) * corner 3.
const cx = (a, b) => a + b / 2;
const cy = (a, b) => b * H;

function grid(a, b, f) {
  return Array.from(b, (bv) => Array.from(a, (av) => f(av, bv)));
}

function indexOf(axis, value) {
  for (let i = 0; i < axis.length; i++) if (Math.abs(axis[i] - value) < 1e-6) return i;
  return -1;
}

/**
 * Plotly data and layout of the plane.
 *
 * @param {object} p
 * @param {Float32Array} p.a alpha axis (columns)
 * @param {Float32Array} p.b beta axis (rows)
 * @param {Float32Array} p.values row-major grid values (NaN beyond the region)
 * @param {object} p.plane {names, margin} from the kernel
 * @param {string} p.label metric name
 * @param {boolean} p.log colour by log10
 * @param {string} p.background the host's background colour (the mask beyond the region)
 */
export function triangleFigure({ a, b, values, plane, label, log, background = "white" }) {
  const n = a.length;
  const z = rows(log ? log10(values) : values, b.length, n);
  const title = (log ? "log10 " : "") + label;
  const hidden = { showgrid: false, showticklabels: "none", showline: false,
    linecolor: "rgba(0,0,0,0)", linewidth: 0, startline: false, endline: false };
  const m = Number(plane.margin) || 0;
  const top = a[n - 1];
  // The corner beyond alpha + beta = 1 + margin, in (alpha, beta), painted over. Its outer
  // edges reach past the carpet by `e`, or the anti-aliased edge shows the colours below.
  const e = 0.05;
  const lo = -m - e;
  const hi = top + e;
  const corner = [[1 + 2 * m + e, lo], [hi, lo], [hi, hi], [lo, hi], [lo, 1 + 2 * m + e]];
  corner.push(corner[0]);
  const names = plane.names || [];
  const outer = [[1 + 2 * m, -m], [-m, 1 + 2 * m], [-m, -m]];
  const vertex = [[1, 0], [0, 1], [0, 0]].map(([av, bv]) => {
    const i = indexOf(a, av);
    const j = indexOf(b, bv);
    return i < 0 || j < 0 ? NaN : values[j * n + i];
  });
  const fmt = (v) => (Number.isFinite(v) ? v.toPrecision(4) : "–");
  const data = [
    { type: "carpet", carpet: CARPET, a: Array.from(a), b: Array.from(b),
      x: grid(a, b, cx), y: grid(a, b, cy), aaxis: hidden, baxis: hidden, hoverinfo: "skip" },
    { type: "contourcarpet", carpet: CARPET, a: Array.from(a), b: Array.from(b), z,
      colorscale: "Viridis", contours: { coloring: "fill" }, line: { width: 0.5 },
      colorbar: { title: { text: title } } },
    { type: "scatter", mode: "lines", fill: "toself", fillcolor: background,
      line: { width: 0, color: background },
      x: corner.map(([av, bv]) => cx(av, bv)), y: corner.map(([av, bv]) => cy(av, bv)),
      hoverinfo: "skip", showlegend: false },
    { type: "scatter", mode: "lines", x: [...CORNERS, CORNERS[0]].map((p) => p[0]),
      y: [...CORNERS, CORNERS[0]].map((p) => p[1]), line: { color: background, width: 1.5 },
      hoverinfo: "skip", showlegend: false },
    { type: "scatter", mode: "markers", name: "models", showlegend: false,
      x: CORNERS.map((p) => p[0]), y: CORNERS.map((p) => p[1]), text: names,
      marker: { symbol: "x", size: 10, color: "red" },
      hovertext: names.map((name, i) => `${name}<br>${label} ${fmt(vertex[i])}`),
      hoverinfo: "text" },
    // The names go at the region's outer corners, on the background, where the
    // contours cannot hide them (the models' own corners lie inside the margin).
    { type: "scatter", mode: "text", name: "names", showlegend: false, hoverinfo: "skip",
      x: outer.map(([av, bv]) => cx(av, bv)), y: outer.map(([av, bv]) => cy(av, bv)),
      text: names, textposition: POSITIONS, textfont: { size: 12 }, cliponaxis: false },
  ];
  const layout = {
    uirevision: "plane", plot_bgcolor: background,
    // The region's bounding box, with room for the names (the mask would stretch autorange).
    xaxis: { visible: false, range: [-1.5 * m - 0.25, 1 + 1.5 * m + 0.25] },
    yaxis: { visible: false, scaleanchor: "x", range: [-m * H - 0.1, (1 + 2 * m) * H + 0.1] },
  };
  return { data, layout };
}
