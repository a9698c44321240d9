// Bundle js/src/widget.js (with the plotly.js partial build) into landscape_widget/static/.
//
//   node build.mjs           one minified build: static/widget.js + static/widget.css
//   node build.mjs --watch   rebuild on change (pair with ANYWIDGET_HMR=1 in the kernel)
//   node build.mjs --outdir DIR   build elsewhere (check_bundle.sh compares with static/)
import * as esbuild from "esbuild";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const watch = args.includes("--watch");
const outIndex = args.indexOf("--outdir");
const outdir = outIndex >= 0 ? resolve(args[outIndex + 1]) : resolve(here, "../landscape_widget/static");

// plotly.js imports maplibre's stylesheet for its map traces, which are not in this build.
const noMapCss = {
  name: "no-map-css",
  setup(build) {
    build.onResolve({ filter: /maplibre-gl\.css$/ }, (a) => ({ path: a.path, namespace: "empty-css" }));
    build.onLoad({ filter: /.*/, namespace: "empty-css" }, () => ({ contents: "", loader: "css" }));
  },
};

const options = {
  entryPoints: { widget: resolve(here, "src/widget.js") },
  outdir,
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  legalComments: "none",
  // As plotly.js's own esbuild config: one regl, a browser stream, `global` is window.
  alias: { regl: "@plotly/regl", stream: "stream-browserify" },
  define: { global: "window", "define.amd": "false" },
  plugins: [noMapCss],
  logLevel: "info",
};

if (watch) {
  const ctx = await esbuild.context({ ...options, minify: false });
  await ctx.watch();
} else {
  await esbuild.build(options);
}
