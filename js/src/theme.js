// The host's colours for the plots and the pattern canvases, read at draw time: JupyterLab's
// CSS variables (Notebook 7 and Voila share them), VS Code's, else what the page shows (the
// widget's computed text colour and the first opaque background up the tree; white if
// none). Also the plotly config every plot uses: no "Share chart" button (plotly.js would
// offer to upload the data to a third party) and no plotly logo.
let probe = null;

/** `color` normalised by the browser: "#rrggbb" or "rgba(r, g, b, a)". */
function normalise(color) {
  if (!probe) probe = document.createElement("canvas").getContext("2d");
  probe.fillStyle = "#000";
  probe.fillStyle = color;
  return probe.fillStyle;
}

/** [r, g, b, a] of a CSS colour (0..255, alpha 0..1). */
export function rgba(color) {
  const c = normalise(color);
  if (c.startsWith("#")) return [1, 3, 5].map((i) => Number.parseInt(c.slice(i, i + 2), 16)).concat(1);
  const m = c.match(/[\d.]+/g) || [0, 0, 0, 0];
  return [Number(m[0]), Number(m[1]), Number(m[2]), m[3] == null ? 1 : Number(m[3])];
}

const luminance = (color) => {
  const [r, g, b] = rgba(color);
  return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
};

function opaqueBackground(el) {
  for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
    const bg = getComputedStyle(node).backgroundColor;
    if (bg && rgba(bg)[3] > 0.5) return bg;
  }
  return "#ffffff";
}

/**
 * The colours of the host around `el`.
 *
 * @param {HTMLElement} el an element of the widget
 * @returns {{text: string, background: string, grid: string, muted: string, dark: boolean}}
 */
export function hostTheme(el) {
  const style = getComputedStyle(el);
  const v = (name) => style.getPropertyValue(name).trim();
  const background = v("--jp-layout-color0") || v("--vscode-editor-background") || opaqueBackground(el);
  const dark = luminance(background) < 0.5;
  const text = v("--jp-ui-font-color1") || v("--vscode-editor-foreground") || style.color
    || (dark ? "#eee" : "#222");
  const grid = v("--jp-border-color2") || (dark ? "#4a4a4a" : "#e5e5e5");
  const muted = v("--jp-ui-font-color3") || (dark ? "#888" : "#999");
  return { text, background, grid, muted, dark };
}

/** Plotly layout colours following `theme` (merged under the figure's own layout). */
export function themedLayout(theme, layout) {
  const axis = (a) => ({ gridcolor: theme.grid, zerolinecolor: theme.grid, linecolor: theme.grid, ...a });
  const out = { ...layout, paper_bgcolor: theme.background, plot_bgcolor: theme.background,
    font: { color: theme.text, ...(layout.font || {}) } };
  for (const k of ["xaxis", "yaxis"]) out[k] = axis(layout[k] || {});
  if (layout.scene) {
    out.scene = { ...layout.scene, bgcolor: theme.background };
    for (const k of ["xaxis", "yaxis", "zaxis"]) {
      out.scene[k] = { ...axis(layout.scene[k] || {}), backgroundcolor: theme.background };
    }
  }
  return out;
}

/** The plotly config of every plot of the widget: nothing in it talks to a server. */
export const PLOT_CONFIG = Object.freeze({
  displaylogo: false,
  showSendToCloud: false,
  plotlyServerURL: "",
  modeBarButtonsToRemove: ["sendChartToCloud"],
});

/** Call `fn` when the host switches theme (JupyterLab sets attributes on <body>). */
export function onThemeChange(fn) {
  if (typeof MutationObserver === "undefined" || !document.body) return () => {};
  let timer = null;
  const observer = new MutationObserver(() => {
    fn();
    // A theme's stylesheet may land a moment after the attribute flips: look again.
    clearTimeout(timer);
    timer = setTimeout(fn, 400);
  });
  observer.observe(document.body, { attributes: true,
    attributeFilter: ["data-jp-theme-light", "data-jp-theme-name", "class", "data-vscode-theme-kind"] });
  return () => { clearTimeout(timer); observer.disconnect(); };
}
