// The pattern editor: paint a binary mask, preview its ternary training mask, fit it with
// multi-point optimisation on the kernel and watch the plane's heatmap stream in.
//
// Painting: press on a cell and drag; the first cell decides whether the stroke draws or
// erases (right button always erases). From the keyboard: the canvas takes focus, the
// arrow keys move a cursor (drawn as an outline), space or Enter toggles its cell. The mask
// lives in the `pattern` trait (rows of 0/1), written once per stroke or key press. The
// canvases take the host's colours (theme.js): ink in the text colour on the background.
// The settings of the last fit come back in the `fit_settings` trait (a re-render or a
// static export shows what was run, not the defaults). Fit sends {kind: "fit", id, spec}; the kernel answers with
// fit_start / fit_update (+ float32 heatmaps) / fit_done messages.
import Plotly from "./plotly.js";
import { f32 } from "./grid.js";
import { imageCells, textCells, ternary, toRows } from "./pattern_cells.js";
import { fitSpec, fitSummary, heatmapFigure } from "./pattern_view.js";
import { hostTheme, PLOT_CONFIG, themedLayout } from "./theme.js";

export { ternary }; // still importable from here (it lives in pattern_cells.js)

const SIZES = [4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64];
const EDITOR_PX = 256;
const VIEWS = [["train_loss", "train loss"], ["train_accuracy", "train accuracy"],
  ["test_loss", "test loss"], ["test_accuracy", "test accuracy"]];
// The ternary preview in the host's colours: good = ink, bad = background, ignored = grey.
const ternaryColors = (theme) => ({ 1: theme.text, [-1]: theme.background, 0: "#8c8c8c" });
const MOVES = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };

/**
 * The pattern editor panel.
 *
 * @param {object} p
 * @param {object} p.model the anywidget model (pattern, _spec_schema)
 * @param {() => boolean} p.offline whether no kernel is behind the view (editing and Fit off)
 */
export function patternPanel({ model, h, row, newId, offline }) {
  // The fit's limits and defaults, from the kernel (landscape_widget/widget/fit_spec.py).
  const { limits, defaults } = model.get("_spec_schema").fit;
  const c = {
    size: h("select", { class: "lw-pattern-size", title: "Grid size (cells per side)" }),
    paint: h("canvas", { class: "lw-pattern-editor", tabIndex: 0, role: "application",
      "aria-roledescription": "pattern editor",
      "aria-label": "Pattern editor: arrow keys move the cursor, space toggles a cell",
      title: "Click and drag to paint; start on a drawn cell (or use the right button) to erase. Keyboard: arrows move, space toggles." }),
    preview: h("canvas", { class: "lw-pattern-preview", role: "img",
      "aria-label": "Training mask preview",
      title: "Training mask: ink = good (loss minimised), blank = bad (maximised up to τ), grey = ignored" }),
    checker: h("button", {}, "Checkerboard"),
    text: h("input", { type: "text", value: "A", maxLength: 4, size: 3, title: "Letter or short word",
      "aria-label": "Text to draw (a letter or short word)" }),
    textBtn: h("button", {}, "Text"),
    p: h("input", { type: "number", min: 0, max: 1, step: 0.05, value: 0.5, title: "Density p",
      "aria-label": "Density p of the random pattern" }),
    random: h("button", {}, "Random"),
    clear: h("button", {}, "Clear"),
    invert: h("button", {}, "Invert"),
    file: h("input", { type: "file", accept: "image/png,image/*", title: "Import a PNG (thresholded, resized to the grid)",
      "aria-label": "Import a PNG" }),
    steps: h("input", { class: "lw-fit-steps", type: "number", min: limits.steps[0],
      max: limits.steps[1], step: 1, value: defaults.steps }),
    lr: h("input", { type: "number", min: 0, step: "any", value: defaults.lr }),
    tau: h("input", { type: "number", min: 0, step: "any", value: defaults.tau }),
    cells: h("input", { type: "number", min: limits.cells_per_step[0],
      max: limits.cells_per_step[1], step: 1, value: defaults.cells_per_step }),
    seed: h("input", { type: "number", min: limits.seed[0], step: 1, value: defaults.seed }),
    fit: h("button", { class: "lw-fit" }, "Fit"),
    stop: h("button", { class: "lw-fit-stop" }, "Stop"),
    resume: h("button", { class: "lw-fit-resume" }, "Resume"),
    export: h("button", { class: "lw-fit-export", title: "Download the heatmap as PNG" }, "Export"),
    view: h("select", { title: "Heatmap shown", "aria-label": "Heatmap shown" }),
    log: h("input", { type: "checkbox", checked: true, title: "log2 colour scale for the loss",
      "aria-label": "log2 colour scale for the loss" }),
  };
  c.size.replaceChildren(...SIZES.map((n) => h("option", { value: n }, `${n} × ${n}`)));
  c.view.replaceChildren(...VIEWS.map(([v, l]) => h("option", { value: v }, l)));
  const plot = h("div", { class: "lw-fit-plot" });
  const status = h("div", { class: "lw-fit-status" });
  const counts = h("div", { class: "lw-pattern-counts" });
  const details = h("details", { class: "lw-pattern" },
    h("summary", {}, "Pattern editor: draw a mask, fit it with multi-point optimisation"),
    h("div", { class: "lw-pattern-body" },
      h("div", { class: "lw-pattern-left" },
        row("grid", c.size),
        h("div", { class: "lw-pattern-canvases" }, c.paint, c.preview),
        counts,
        h("div", { class: "lw-pattern-presets" }, c.checker, c.text, c.textBtn, c.p, c.random,
          c.clear, c.invert),
        row("import PNG", c.file),
        row("steps", c.steps), row("lr (Adam)", c.lr), row("τ", c.tau),
        row("cells / step", c.cells), row("seed", c.seed),
        h("div", { class: "lw-buttons" }, c.fit, c.stop, c.resume, c.export)),
      h("div", { class: "lw-pattern-right" }, row("show", c.view, c.log), plot, status)));

  let rows = 8;
  let cols = 8;
  let cells = new Uint8Array(rows * cols);
  let fit = null; // {id, rows, cols, mask, step, steps, arrays, scores, last, done, stopped}
  let updates = 0;
  let error = null;
  let frame = 0;

  // --- the pattern trait ---------------------------------------------------------------
  function loadTrait() {
    const p = model.get("pattern") || [];
    if (!p.length || !p[0].length) return;
    rows = p.length;
    cols = p[0].length;
    cells = new Uint8Array(rows * cols);
    p.forEach((r, i) => r.forEach((v, j) => { cells[i * cols + j] = v ? 1 : 0; }));
    if (rows !== cols || !SIZES.includes(rows)) {
      // A pattern set from Python may be any size (or not square): list it as it is.
      c.size.querySelectorAll("option.lw-custom").forEach((o) => o.remove());
      c.size.append(h("option", { value: String(rows), class: "lw-custom" }, `${rows} × ${cols}`));
    }
    c.size.value = String(rows);
    drawEditor();
  }
  function saveTrait() {
    model.set("pattern", toRows(cells, rows, cols));
    model.save_changes();
  }
  function setCells(next, size = rows) {
    rows = cols = size;
    cells = next;
    c.size.value = String(size);
    drawEditor();
    saveTrait();
  }

  // --- drawing the editor and the ternary preview -----------------------------------
  function cellPx() { return Math.max(4, Math.floor(EDITOR_PX / Math.max(rows, cols))); }
  let cursor = 0; // the keyboard cursor's cell (row-major index)
  function drawEditor() {
    const px = cellPx();
    const theme = hostTheme(details);
    for (const cv of [c.paint, c.preview]) {
      cv.width = cols * px;
      cv.height = rows * px;
    }
    const ctx = c.paint.getContext("2d");
    ctx.fillStyle = theme.background;
    ctx.fillRect(0, 0, cols * px, rows * px);
    ctx.fillStyle = theme.text;
    for (let k = 0; k < cells.length; k++) {
      if (cells[k]) ctx.fillRect((k % cols) * px, Math.floor(k / cols) * px, px, px);
    }
    ctx.strokeStyle = theme.grid;
    ctx.beginPath();
    for (let i = 0; i <= rows; i++) { ctx.moveTo(0, i * px + 0.5); ctx.lineTo(cols * px, i * px + 0.5); }
    for (let j = 0; j <= cols; j++) { ctx.moveTo(j * px + 0.5, 0); ctx.lineTo(j * px + 0.5, rows * px); }
    ctx.stroke();
    cursor = Math.min(cursor, cells.length - 1);
    if (document.activeElement === c.paint) {
      // The keyboard cursor: a two-tone outline, visible on ink and on background.
      const [x, y] = [(cursor % cols) * px, Math.floor(cursor / cols) * px];
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#1e88e5";
      ctx.strokeRect(x + 1, y + 1, px - 2, px - 2);
      ctx.lineWidth = 1;
      ctx.strokeStyle = "#ff9800";
      ctx.strokeRect(x + 3.5, y + 3.5, px - 7, px - 7);
    }
    const t = ternary(cells, rows, cols);
    const colors = ternaryColors(theme);
    const pctx = c.preview.getContext("2d");
    let good = 0;
    let bad = 0;
    for (let k = 0; k < t.length; k++) {
      pctx.fillStyle = colors[t[k]];
      pctx.fillRect((k % cols) * px, Math.floor(k / cols) * px, px, px);
      good += t[k] === 1;
      bad += t[k] === -1;
    }
    counts.textContent = `training mask: ${good} good (ink) · ${bad} bad (blank) · ${t.length - good - bad} ignored (grey)`;
    c.fit.disabled = offline() || good === 0;
    const [ci, cj] = [Math.floor(cursor / cols), cursor % cols];
    c.paint.setAttribute("aria-description", `${rows} × ${cols} cells, ${cells.reduce((a, b) => a + b, 0)} drawn; `
      + `cursor at row ${ci + 1}, column ${cj + 1}: ${cells[cursor] ? "drawn" : "blank"}`);
  }

  let stroke = null; // the value a stroke paints
  function cellAt(ev) {
    const r = c.paint.getBoundingClientRect();
    const j = Math.floor(((ev.clientX - r.left) / r.width) * cols);
    const i = Math.floor(((ev.clientY - r.top) / r.height) * rows);
    return i >= 0 && i < rows && j >= 0 && j < cols ? i * cols + j : -1;
  }
  function paintAt(ev) {
    const k = cellAt(ev);
    if (k < 0 || stroke == null || cells[k] === stroke) return;
    cells[k] = stroke;
    drawEditor();
  }
  c.paint.addEventListener("contextmenu", (ev) => ev.preventDefault());
  c.paint.addEventListener("pointerdown", (ev) => {
    if (offline()) return;
    const k = cellAt(ev);
    if (k < 0) return;
    stroke = ev.button === 2 ? 0 : (cells[k] ? 0 : 1);
    c.paint.setPointerCapture(ev.pointerId);
    paintAt(ev);
  });
  c.paint.addEventListener("pointermove", (ev) => { if (stroke != null) paintAt(ev); });
  const endStroke = () => {
    if (stroke == null) return;
    stroke = null;
    saveTrait();
  };
  c.paint.addEventListener("pointerup", endStroke);
  c.paint.addEventListener("pointercancel", endStroke);
  // Called by widget.js for every key aimed at the widget (it stops them at the window).
  function onKey(ev) {
    if (ev.target !== c.paint || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const move = MOVES[ev.key];
    if (move) {
      const i = Math.min(rows - 1, Math.max(0, Math.floor(cursor / cols) + move[0]));
      const j = Math.min(cols - 1, Math.max(0, (cursor % cols) + move[1]));
      cursor = i * cols + j;
    } else if (ev.key === " " || ev.key === "Enter") {
      if (offline()) return;
      cells[cursor] = 1 - cells[cursor];
      saveTrait();
    } else {
      return;
    }
    ev.preventDefault(); // no page scroll
    drawEditor();
  }
  c.paint.addEventListener("focus", drawEditor);
  c.paint.addEventListener("blur", drawEditor);

  // --- presets -------------------------------------------------------------------------
  const size = () => Number.parseInt(c.size.value, 10) || 8;
  c.size.addEventListener("change", () => setCells(new Uint8Array(size() * size()), size()));
  c.checker.addEventListener("click", () => {
    const n = size();
    setCells(Uint8Array.from({ length: n * n }, (_, k) => ((Math.floor(k / n) + (k % n)) % 2 === 0 ? 1 : 0)), n);
  });
  c.textBtn.addEventListener("click", () => {
    if (c.text.value.trim()) setCells(textCells(c.text.value.trim(), size()), size());
  });
  c.random.addEventListener("click", () => {
    const p = Math.min(1, Math.max(0, Number.parseFloat(c.p.value) || 0));
    const n = size();
    setCells(Uint8Array.from({ length: n * n }, () => (Math.random() < p ? 1 : 0)), n);
  });
  c.clear.addEventListener("click", () => setCells(new Uint8Array(rows * cols), rows));
  c.invert.addEventListener("click", () => setCells(cells.map((v) => 1 - v), rows));
  c.file.addEventListener("change", async () => {
    const file = c.file.files && c.file.files[0];
    if (!file) return;
    try {
      setCells(await imageCells(file, size()), size());
      error = null;
    } catch (err) {
      error = `import: ${err.message || err}`;
    }
    c.file.value = "";
    showStatus();
  });

  // --- fitting -------------------------------------------------------------------------
  function startFit(resume) {
    error = null;
    const spec = fitSpec(toRows(cells, rows, cols), c, { limits, defaults }, resume);
    model.send({ kind: "fit", id: newId().replace("js-", "js-fit-"), spec });
  }
  c.fit.addEventListener("click", () => startFit(false));
  c.resume.addEventListener("click", () => startFit(true));
  c.stop.addEventListener("click", () => model.send({ kind: "fit_stop", id: fit ? fit.id : "none" }));
  c.export.addEventListener("click", () => {
    if (fit) Plotly.downloadImage(plot, { format: "png", filename: `pattern-fit-step-${fit.step}` });
  });
  c.view.addEventListener("change", schedule);
  c.log.addEventListener("change", schedule);

  function loadUpdate(msg, arrays) {
    fit = { ...(fit && fit.id === msg.id ? fit : {}), id: msg.id, rows: msg.rows, cols: msg.cols,
      mask: msg.mask, step: msg.step, steps: msg.steps, scores: msg.scores, last: msg.last,
      splits: msg.splits, arrays, seconds: msg.seconds, note: msg.note || "", done: false };
    updates += 1;
    plot.dataset.fitUpdates = String(updates);
    schedule();
  }
  function onMessage(msg, buffers) {
    if (!msg || typeof msg !== "object") return false;
    if (msg.kind === "fit_start") {
      fit = { id: msg.id, rows: msg.rows, cols: msg.cols, mask: msg.mask, step: 0,
        steps: msg.steps, splits: msg.splits, arrays: fit ? fit.arrays : null, note: msg.note || "",
        done: false };
    } else if (msg.kind === "fit_update") {
      const [trl, tra, tel, tea] = (buffers || []).map((b) => f32(b));
      loadUpdate(msg, { train_loss: trl, train_accuracy: tra, test_loss: tel, test_accuracy: tea });
    } else if (msg.kind === "fit_done") {
      if (fit && fit.id === msg.id) Object.assign(fit, { done: true, stopped: msg.stopped, step: msg.step, seconds: msg.seconds });
    } else if (msg.kind === "error" && typeof msg.id === "string" && msg.id.startsWith("js-fit")) {
      error = msg.message;
    } else {
      return false;
    }
    showStatus();
    return true;
  }

  function showStatus() {
    status.replaceChildren(h("span", {}, fitSummary(fit).join(" · ")),
      ...(error ? [h("span", { class: "lw-error" }, ` ${error}`)] : []));
  }

  function schedule() { if (!frame) frame = requestAnimationFrame(draw); }
  function draw() {
    frame = 0;
    const figure = heatmapFigure(fit, c.view.value, c.log.checked, updates);
    if (!figure) return;
    const { data, layout } = figure;
    Promise.resolve(Plotly.react(plot, data, themedLayout(hostTheme(plot), layout), { ...PLOT_CONFIG })).catch((err) => {
      error = `plot: ${err && err.message ? err.message : err}`;
      showStatus();
    });
  }

  // --- traits, re-render, static export ------------------------------------------------
  const onPattern = () => { if (stroke == null) loadTrait(); };
  model.on("change:pattern", onPattern);
  details.open = !!model.get("show_pattern");
  details.addEventListener("toggle", () => {
    if (offline() || details.open === !!model.get("show_pattern")) return;
    model.set("show_pattern", details.open);
    model.save_changes();
  });
  const onShow = () => { details.open = !!model.get("show_pattern"); };
  model.on("change:show_pattern", onShow);
  const last = model.get("pattern_result");
  if (last && last.rows) {
    const arrays = {};
    for (const k of ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]) arrays[k] = last[k] ? f32(last[k]) : null;
    loadUpdate(last, arrays);
    const st = model.get("fit_status") || {};
    if (st.state === "done" || st.state === "stopped") Object.assign(fit, { done: true, stopped: st.state === "stopped" });
  }
  const EDIT = ["stop", "resume", "checker", "textBtn", "random", "clear", "invert", "file", "size"];
  function sync() {
    for (const k of EDIT) c[k].disabled = offline();
    drawEditor(); // Fit: off without a kernel or a good cell
  }

  // The settings the last fit ran with (steps of that run, lr, τ, cells per step, seed).
  const SETTINGS = { steps: "steps", lr: "lr", tau: "tau", cells_per_step: "cells", seed: "seed" };
  function loadSettings() {
    const s = model.get("fit_settings") || {};
    for (const [key, input] of Object.entries(SETTINGS)) {
      if (s[key] != null && document.activeElement !== c[input]) c[input].value = String(s[key]);
    }
  }
  model.on("change:fit_settings", loadSettings);
  loadSettings();
  loadTrait();
  sync();
  showStatus();

  return {
    node: details,
    onMessage,
    onKey,
    sync,
    redraw() {
      drawEditor();
      schedule();
    },
    snapshot: () => ({ rows, cols, drawn: cells.reduce((a, b) => a + b, 0), updates,
      step: fit ? fit.step : 0, done: fit ? !!fit.done : false, error,
      ternary: Array.from(ternary(cells, rows, cols)) }),
    dispose() {
      if (frame) cancelAnimationFrame(frame);
      model.off("change:pattern", onPattern);
      model.off("change:show_pattern", onShow);
      model.off("change:fit_settings", loadSettings);
      Plotly.purge(plot);
    },
  };
}
