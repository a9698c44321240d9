// Controls of the direction types through the widget's named models (LandscapeWidget(
// models={...})): "interpolate between two models" and "plane through three models".
//
// The direction select lists one entry per type; a select per vertex picks the models
// (an entry per ordered pair and per triple would grow as n^3). The kernel validates the
// names again (landscape_widget/widget/protocol.py).

const PLANE_DEFAULTS = { mode: "2d", quantity: "loss", resolution: 20, x_range: [-0.2, 1.2],
  y_range: [-0.2, 1.2] }; // the PROPOSAL's 0.05 lattice and margin 0.2
const INTERPOLATE_RANGE = [-0.5, 1.5]; // A at 0, B at 1, with room on both sides
const TITLES = {
  2: ["from (α = 0)", "to (α = 1)"],
  3: ["right corner (α = 1)", "top corner (β = 1)", "left corner (α = β = 0)"],
};

/** `count` distinct names: the current ones that still fit, then the first others. */
function pick(names, current, count) {
  const out = [];
  for (const v of [...(current || []), ...names]) {
    if (names.includes(v) && !out.includes(v)) out.push(v);
  }
  return out.slice(0, count);
}

/**
 * The trait values for a switch to direction entry `entry` (from the select).
 *
 * The plane replaces mode, resolution and ranges with its own; they are kept in `saved`
 * and restored when the user leaves it (the spec's defaults of `schema` if none were kept).
 */
export function typeChange(entry, get, saved, schema) {
  const out = { direction: entry.direction, norm: entry.norm };
  const from = get("direction");
  if (entry.count) {
    out.vertices = pick(entry.models || [], get("vertices"), entry.count);
    out.quantity = "loss"; // curvature maps are centred on the widget's model
  }
  if (entry.direction === "plane" && from !== "plane") {
    saved.before = { mode: get("mode"), resolution: get("resolution"),
      x_range: get("x_range"), y_range: get("y_range") };
    Object.assign(out, PLANE_DEFAULTS);
  } else if (entry.direction !== "plane" && from === "plane") {
    const { resolution, x_range, y_range } = schema.defaults;
    Object.assign(out, saved.before || { resolution, x_range, y_range });
  }
  if (entry.direction === "interpolate" && from !== "interpolate") {
    out.x_range = INTERPOLATE_RANGE;
    // n = 4k + 1 points on [-0.5, 1.5] put A (alpha = 0) and B (alpha = 1) on the grid.
    const n = out.resolution || get("resolution");
    out.resolution = n + ((5 - (n % 4)) % 4);
  }
  return out;
}

/** The vertex selects; `onChange(vertices)` fires when the user picks a model. */
export function modelPicker({ h, onChange }) {
  const selects = [0, 1, 2].map(() => h("select", { class: "lw-vertex" }));
  const node = h("span", { class: "lw-vertices" }, ...selects);
  let count = 0;
  selects.forEach((select, i) => select.addEventListener("change", () => {
    const values = selects.slice(0, count).map((s) => s.dataset.value);
    const j = values.indexOf(select.value);
    // A model picked twice: the other select takes the one this select had (a swap).
    if (j >= 0 && j !== i) values[j] = values[i];
    values[i] = select.value;
    onChange(values);
  }));

  /** Show the selects of direction entry `entry` with `vertices` chosen. */
  function sync(entry, vertices, disabled) {
    count = entry && entry.count ? entry.count : 0;
    const names = count ? entry.models || [] : [];
    const chosen = pick(names, vertices, count);
    selects.forEach((select, i) => {
      select.style.display = i < count ? "" : "none";
      if (i >= count) return;
      select.replaceChildren(...names.map((name) => h("option", { value: name }, name)));
      select.value = chosen[i] || "";
      select.dataset.value = select.value;
      select.title = TITLES[count][i];
      select.disabled = disabled;
    });
    return count > 0;
  }

  return { node, sync };
}

/** Named models on a 2D slice (A at the origin, B at alpha = 1 for "interpolate"). */
export function marksTrace(marks) {
  return { type: "scatter", mode: "markers+text", showlegend: false, name: "models",
    x: marks.map((m) => m.x), y: marks.map((m) => m.y), text: marks.map((m) => m.name),
    textposition: "top center", textfont: { color: "white" },
    marker: { symbol: "x", color: "red", size: 9 }, hovertemplate: "%{text}<extra></extra>" };
}

/** Linear interpolation of the curve (x ascending) at `at`; NaN outside it. */
function curveAt(x, values, at) {
  for (let i = 0; i + 1 < x.length; i++) {
    if (x[i] <= at && at <= x[i + 1]) {
      const t = x[i + 1] > x[i] ? (at - x[i]) / (x[i + 1] - x[i]) : 0;
      return values[i] + t * (values[i + 1] - values[i]);
    }
  }
  return NaN;
}

/** The named models on a 1D curve (A at alpha = 0, B at alpha = 1). */
export function marksOnCurve(marks, x, values) {
  return { ...marksTrace(marks), y: marks.map((m) => curveAt(x, values, m.x)), textfont: {},
    hovertemplate: "%{text}<extra></extra>" };
}
