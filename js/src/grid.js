// Grid helpers: binary buffers from the kernel, and the coarse-to-fine display fill.

/** A Float32Array copy of a DataView / ArrayBuffer / typed array (alignment-safe). */
export function f32(buf) {
  return new Float32Array(bytesOf(buf));
}

/** An Int32Array copy of a binary buffer. */
export function i32(buf) {
  return new Int32Array(bytesOf(buf));
}

function bytesOf(buf) {
  if (buf == null) return new ArrayBuffer(0);
  if (buf instanceof ArrayBuffer) return buf.slice(0);
  if (ArrayBuffer.isView(buf)) {
    return buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  }
  return new ArrayBuffer(0);
}

/** Nearest index of the lattice {c + k*s} inside [0, n), or -1. */
function nearest(i, c, s, n) {
  let j = c + Math.round((i - c) / s) * s;
  if (j > n - 1) j -= s;
  if (j < 0) j += s;
  return j >= 0 && j < n ? j : -1;
}

/**
 * Values for display: points not computed yet take the value of the nearest computed
 * point of a coarser lattice (the kernel visits every 2^L-th index first, anchored at the
 * middle index), so the picture is complete from the first level on and sharpens as
 * finer tiles arrive. Computed points (including NaN ones) are shown as they are; a NaN
 * neighbour is passed over for a finite coarser one (beyond the plane through three models
 * every point is NaN, and the region's edge would show gaps until its last tile).
 *
 * @param {Float32Array} values grid values, NaN where not computed
 * @param {Uint8Array} known 1 where computed
 * @param {number[]} shape [n] or [ny, nx]
 * @returns {Float32Array}
 */
export function fillCoarse(values, known, shape) {
  const out = Float32Array.from(values);
  const nx = shape[shape.length - 1];
  const ny = shape.length === 2 ? shape[0] : 1;
  const cx = (nx - 1) >> 1;
  const cy = (ny - 1) >> 1;
  const top = 2 * Math.max(nx, ny);
  for (let iy = 0; iy < ny; iy++) {
    for (let ix = 0; ix < nx; ix++) {
      const k = iy * nx + ix;
      if (known[k]) continue;
      for (let s = 2; s <= top; s *= 2) {
        const jx = nearest(ix, cx, s, nx);
        const jy = ny === 1 ? 0 : nearest(iy, cy, s, ny);
        if (jx < 0 || jy < 0) continue;
        const j = jy * nx + jx;
        if (known[j] && !Number.isNaN(values[j])) {
          out[k] = values[j];
          break;
        }
      }
    }
  }
  fillNearest(out, known, nx, ny);
  return out;
}

/**
 * Points no lattice reaches (the coarsest level is only partly computed: the kernel's
 * first tile is small, and a grid cancelled after it stays so) take the value of the
 * nearest filled point, found breadth-first over the grid's 4-neighbours. Computed NaN
 * points stay NaN, but the search passes through them. In place.
 */
function fillNearest(out, known, nx, ny) {
  const carry = Float32Array.from(out); // the value a point hands on to its neighbours
  const seen = new Uint8Array(out.length);
  const queue = new Int32Array(out.length);
  let head = 0;
  let tail = 0;
  let missing = 0;
  for (let k = 0; k < out.length; k++) {
    if (!Number.isNaN(out[k])) {
      seen[k] = 1;
      queue[tail++] = k;
    } else if (!known[k]) missing += 1;
  }
  if (!missing || !tail) return;
  const visit = (j, v) => {
    if (seen[j]) return;
    seen[j] = 1;
    carry[j] = v;
    if (!known[j]) out[j] = v;
    queue[tail++] = j;
  };
  while (head < tail) {
    const k = queue[head++];
    const v = carry[k];
    const ix = k % nx;
    if (ix > 0) visit(k - 1, v);
    if (ix < nx - 1) visit(k + 1, v);
    if (k >= nx) visit(k - nx, v);
    if (k + nx < nx * ny) visit(k + nx, v);
  }
}

/** log10 of positive values, NaN elsewhere. */
export function log10(values) {
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    out[i] = v > 0 ? Math.log10(v) : NaN;
  }
  return out;
}

/** Rows of a row-major grid, as plain arrays (what plotly's 2D traces read). */
export function rows(values, ny, nx) {
  const out = new Array(ny);
  for (let i = 0; i < ny; i++) out[i] = Array.from(values.subarray(i * nx, (i + 1) * nx));
  return out;
}
