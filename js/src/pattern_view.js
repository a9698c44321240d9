// What the pattern editor (js/src/pattern.js) sends and shows of a fit: the spec of a
// `fit` message (its settings clamped to the kernel's limits), and from the fit's state
// `fit` ({rows, cols, mask, step, steps, arrays, scores, last, done, stopped, seconds,
// note}) the plotly heatmap of one of its four arrays and the parts of its status line.
// Plain functions of their inputs: the editor owns the state, the DOM and the plot.

/**
 * The spec of a `fit` message: the mask, and the settings boxes' values clamped to the
 * kernel's limits (landscape_widget/widget/fit_spec.py, sent once in `_spec_schema`).
 *
 * @param {number[][]} mask rows of 0/1
 * @param {object} boxes the settings' input elements: {steps, lr, tau, cells, seed}
 * @param {{limits: object, defaults: object}} fit the `fit` part of `_spec_schema`
 * @param {boolean} resume whether the fit resumes the last one
 * @returns {object} the spec (a box that is not a number gives the default)
 */
export function fitSpec(mask, boxes, { limits, defaults }, resume) {
  const numOr = (input, fallback) => {
    const v = Number.parseFloat(input.value);
    return Number.isFinite(v) ? v : fallback;
  };
  const clamp = (k, input) => Math.min(limits[k][1], Math.max(limits[k][0], numOr(input, defaults[k])));
  const steps = Math.round(clamp("steps", boxes.steps));
  return {
    mask, steps, lr: clamp("lr", boxes.lr), tau: clamp("tau", boxes.tau),
    cells_per_step: Math.round(clamp("cells_per_step", boxes.cells)),
    batch_size: defaults.batch_size, seed: Math.round(clamp("seed", boxes.seed)),
    every: Math.max(1, Math.min(25, Math.round(steps / 30))), resume,
  };
}

/**
 * The heatmap of the fit's `view` array (train/test loss or accuracy), as plotly data and
 * layout; the test array falls back to the train one when there are no test data.
 *
 * @param {object|null} fit the editor's fit state
 * @param {string} view "train_loss" | "train_accuracy" | "test_loss" | "test_accuracy"
 * @param {boolean} logScale log2 colour scale (losses only)
 * @param {number} updates the count of updates received (plotly's datarevision)
 * @returns {{data: object[], layout: object}|null} null while there is nothing to show
 */
export function heatmapFigure(fit, view, logScale, updates) {
  if (!fit || !fit.arrays) return null;
  let key = view;
  if (!fit.arrays[key] || !fit.arrays[key].length) key = key.replace("test", "train");
  const values = fit.arrays[key];
  if (!values || !values.length) return null;
  const isLoss = key.endsWith("loss");
  const log = isLoss && logScale;
  const z = [];
  const text = [];
  for (let i = 0; i < fit.rows; i++) {
    const r = [];
    const tr = [];
    for (let j = 0; j < fit.cols; j++) {
      const v = values[i * fit.cols + j];
      r.push(log ? Math.log2(Math.max(v, 2 ** -12)) : v);
      const m = fit.mask ? fit.mask[i * fit.cols + j] : 0;
      tr.push(`${v.toPrecision(4)} (${m === 1 ? "good" : m === -1 ? "bad" : "ignored"})`);
    }
    z.push(r);
    text.push(tr);
  }
  const data = [{ type: "heatmap", z, text, colorscale: isLoss ? "RdBu" : "Viridis",
    zmin: isLoss ? undefined : 0, zmax: isLoss ? undefined : 1,
    colorbar: { title: { text: `${log ? "log2 " : ""}${key.replace("_", " ")}` } },
    hovertemplate: "row %{y}, col %{x}: %{text}<extra></extra>" }];
  const layout = { margin: { l: 40, r: 10, t: 10, b: 30 }, autosize: true,
    yaxis: { autorange: "reversed", scaleanchor: "x", constrain: "domain" },
    xaxis: { constrain: "domain" }, uirevision: "pattern", datarevision: updates };
  return { data, layout };
}

/**
 * The status line's parts for the fit: step, scores, cross-entropies, done or stopped, note.
 *
 * @param {object|null} fit the editor's fit state
 * @returns {string[]} the parts (none without a fit), joined with " · " by the editor
 */
export function fitSummary(fit) {
  const parts = [];
  if (fit) {
    parts.push(`step ${fit.step} / ${fit.steps}`);
    const s = fit.scores || {};
    for (const split of ["train", "test"]) {
      if (s[split] && s[split].acc_diff != null) parts.push(`acc_diff ${split} ${s[split].acc_diff.toFixed(3)}`);
    }
    if (fit.last && fit.last.good_ce != null) parts.push(`CE good ${fit.last.good_ce.toFixed(3)} / bad ${fit.last.bad_ce != null ? fit.last.bad_ce.toFixed(3) : "–"}`);
    if (fit.done) parts.push(fit.stopped ? "stopped" : `done in ${(fit.seconds || 0).toFixed(1)} s`);
    // What the fit's user should know (parameters the three networks share): fit_pattern
    // warns of it in the kernel's fit thread, where nobody sees it.
    if (fit.note) parts.push(fit.note);
  }
  return parts;
}
