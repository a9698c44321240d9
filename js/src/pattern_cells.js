// The cells of the pattern editor (js/src/pattern.js) from other sources, as flat row-major
// arrays of 0/1: the ternary training mask of a binary pattern (the kernel's
// landscape_widget.ternary_mask, for the preview), and a text or an image file rasterised
// onto the grid, and the rows of 0/1 the `pattern` trait and a fit's mask are written as.
// Plain functions of their inputs: no state, no trait, no message.

// PAPERS.md (c) step 1, as landscape_widget.ternary_mask: +1 good, -1 bad, 0 ignored.
export function ternary(cells, rows, cols) {
  const out = new Int8Array(rows * cols);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      let drawn = 0;
      let seen = 0;
      for (let a = Math.max(0, i - 1); a <= Math.min(rows - 1, i + 1); a++) {
        for (let b = Math.max(0, j - 1); b <= Math.min(cols - 1, j + 1); b++) {
          drawn += cells[a * cols + b];
          seen += 1;
        }
      }
      const v = cells[i * cols + j];
      out[i * cols + j] = v ? (drawn === seen ? 0 : 1) : (drawn === 0 ? 0 : -1);
    }
  }
  return out;
}

function inkToCells(ctx, size, useAlpha) {
  const { data } = ctx.getImageData(0, 0, size, size);
  const cells = new Uint8Array(size * size);
  for (let k = 0; k < size * size; k++) {
    const [r, g, b, a] = [data[4 * k], data[4 * k + 1], data[4 * k + 2], data[4 * k + 3]];
    const ink = useAlpha ? a / 255 : 1 - (a / 255) * ((r + g + b) / 765);
    cells[k] = ink > 0.5 ? 1 : 0;
  }
  return cells;
}

// A letter or short word, drawn as large as fits, thresholded to size x size cells.
export function textCells(text, size) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  let px = size;
  ctx.font = `bold ${px}px sans-serif`;
  const width = ctx.measureText(text).width;
  if (width > size * 0.95) px = Math.max(4, Math.floor((px * size * 0.95) / width));
  ctx.font = `bold ${px}px sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillStyle = "#000";
  ctx.fillText(text, size / 2, size / 2 + px * 0.05);
  return inkToCells(ctx, size, true);
}

// An image file resized to size x size cells; ink is its alpha if it has transparency,
// else its darkness.
export async function imageCells(file, size) {
  const url = URL.createObjectURL(file);
  try {
    const img = new Image();
    await new Promise((ok, fail) => { img.onload = ok; img.onerror = () => fail(new Error("not an image")); img.src = url; });
    const probe = document.createElement("canvas");
    probe.width = img.naturalWidth;
    probe.height = img.naturalHeight;
    const pctx = probe.getContext("2d");
    pctx.drawImage(img, 0, 0);
    const all = pctx.getImageData(0, 0, probe.width, probe.height).data;
    let transparent = false;
    for (let k = 3; k < all.length; k += 4) if (all[k] < 250) { transparent = true; break; }
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = size;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(img, 0, 0, size, size);
    return inkToCells(ctx, size, transparent);
  } finally {
    URL.revokeObjectURL(url);
  }
}

// The flat row-major cells as rows of 0/1 (the `pattern` trait's and a fit's `mask` form).
export function toRows(cells, rows, cols) {
  const out = [];
  for (let i = 0; i < rows; i++) out.push(Array.from(cells.subarray(i * cols, (i + 1) * cols)));
  return out;
}
