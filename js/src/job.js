// A computation's grid on the front end: filled tile by tile from the kernel's `start` and
// `tile` messages, or loaded whole from the `result` trait. NaN marks a point not known.
import { f32, i32 } from "./grid.js";

/** The empty job of a `start` message (buffers: the x axis, then y in 2D). */
export function newJob(msg, buffers) {
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

/** The job of a `result` trait (ended; a cancelled one knows only its non-NaN points). */
export function resultJob(r) {
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
    for (let k = 0; k < size; k++) loaded.known[k] = Number.isNaN(first[k]) ? 0 : 1;
  }
  return loaded;
}

/** Copy a `tile` message's buffers ([flat indices, loss, accuracy]) into `job`. */
export function applyTile(job, buffers) {
  const flat = i32(buffers[0]);
  const lo = f32(buffers[1]);
  const ac = f32(buffers[2]);
  for (let i = 0; i < flat.length; i++) {
    const k = flat[i];
    if (k < 0 || k >= job.known.length) continue;
    if (lo.length) job.loss[k] = lo[i];
    if (ac.length) job.acc[k] = ac[i];
    job.known[k] = 1;
  }
  job.tiles += 1;
}

/** How many points of `job` are known. */
export const knownCount = (job) => job.known.reduce((a, b) => a + b, 0);
