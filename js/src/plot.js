// The main plot of a job's grid: the line (1D), contour, heatmap and 3D surface views, with
// their overlays (the model or the named models, the training path, the curve shape), and
// the plane through three models (triangle.js). Redrawn with Plotly.react under a constant
// uirevision (zoom and camera survive new data) and a bumped datarevision.
import Plotly from "./plotly.js";
import { fillCoarse, log10, rows } from "./grid.js";
import { marksOnCurve, marksTrace } from "./models.js";
import { shapeOverlay } from "./shapes.js";
import { PLOT_CONFIG, themedLayout } from "./theme.js";
import { triangleFigure } from "./triangle.js";

const UIREVISION = "landscape";

/**
 * Plotly data and layout of `job`, shown as the display traits (read with `get`) say, in the
 * host's colours `theme` (theme.js).
 */
export function figure(job, get, theme) {
  const metric = get("metric") === "accuracy" && job.metrics.includes("accuracy") ? "accuracy" : "loss";
  const raw = metric === "accuracy" ? job.acc : job.loss;
  // Log scale is for the loss (and the curvature ratio): accuracy lives in [0, 1].
  const log = !!get("log_scale") && metric !== "accuracy";
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
      layout: { xaxis: { title: { text: xTitle } },
        annotations: shape.annotations.map((a) => ({ ...a, bgcolor: theme.background })),
        yaxis: { title: { text: label }, type: log ? "log" : "linear" } },
    };
  }
  if (job.plane) {
    return triangleFigure({ a: job.x, b: job.y, values, plane: job.plane, label, log,
      background: theme.background });
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

/**
 * Draw figure `fig` into `plot` as data revision `revision`, in the colours of `theme`; a
 * promise of the redraw.
 */
export function react(plot, fig, revision, theme) {
  // The triangle brings its own uirevision: a zoom on a grid must not carry over to it.
  const layout = themedLayout(theme, { uirevision: UIREVISION, ...fig.layout,
    datarevision: revision, margin: { l: 55, r: 10, t: 20, b: 45 }, autosize: true });
  const config = { ...PLOT_CONFIG, responsive: false };
  return Promise.resolve(Plotly.react(plot, fig.data, layout, config));
}
