// The status line under the plot: the progress bar, then the device, rate, percentage and
// ETA of the running job, the summary of a finished or cancelled one, or the `status`
// trait (a job that has sent no grid yet, or a view opened with no job), and any error.
// A view that cannot compute (no kernel) says why first.
import { h } from "./dom.js";

function fmt(n, digits = 3) {
  if (n == null || !Number.isFinite(n)) return "–";
  return Math.abs(n) >= 1000 ? Math.round(n).toLocaleString() : n.toPrecision(digits);
}

function fmtTime(s) {
  if (s == null || !Number.isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** "done: E evaluated, R reused in T" of a done message (or the status trait of one). */
function summary(d) {
  return `done: ${d.evaluated} evaluated, ${d.reused} reused in ${fmtTime(d.seconds)}`;
}

/**
 * Fill the progress `bar` and the status line `node`.
 *
 * @param {object} p
 * @param {object} p.s the `status` trait ({} if none; `traceback` after a failure)
 * @param {object|null} p.live the last progress / done / cancelled message of the job shown
 * @param {object|null} p.job the job shown (its device)
 * @param {string|null} p.error the last error text of this view
 * @param {string|null} p.offline why this view cannot compute (null if it can)
 */
export function showStatus(bar, node, { s, live, job, error, offline = null }) {
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
    parts.push(summary(live), (job && job.device) || s.device || "");
    if (live.nonfinite) parts.push(`${live.nonfinite} non-finite`);
    if (live.stats) parts.push(live.stats);
  } else if (s.state === "done" && s.evaluated != null) {
    // A re-render (or a restored view) of a finished job: the kernel's summary of it.
    pct = 100;
    parts.push(summary(s), s.device || "");
    if (s.nonfinite) parts.push(`${s.nonfinite} non-finite`);
    if (s.stats) parts.push(s.stats);
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
  // A failed job's traceback (the kernel keeps it, also in widget.last_error) on hover.
  const where = s.state === "error" && s.traceback ? { title: s.traceback } : {};
  node.replaceChildren(...(offline ? [h("div", { class: "lw-offline-note", role: "note" }, offline)] : []),
    h("span", {}, text), ...(err ? [h("span", { class: "lw-error", ...where }, ` ${err}`)] : []));
}
