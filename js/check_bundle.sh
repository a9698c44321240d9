#!/usr/bin/env bash
# Rebuild the front-end bundle from js/ and check it equals the committed one in
# landscape_widget/static/ (CI runs this; a difference means `cd js && npm run build` was
# not run after editing js/src, or package-lock.json changed).
#
#   js/check_bundle.sh          installs js/node_modules with `npm ci` if missing
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
static="$here/../landscape_widget/static"
cd "$here"
if [[ ! -d node_modules/esbuild || ! -d node_modules/plotly.js ]]; then
  npm ci --no-audit --no-fund
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
node build.mjs --outdir "$out" >/dev/null 2>&1 || node build.mjs --outdir "$out"
status=0
for f in widget.js widget.css; do
  if ! cmp -s "$out/$f" "$static/$f"; then
    echo "landscape_widget/static/$f is out of date with js/ (rebuild: cd js && npm run build)" >&2
    status=1
  fi
done
if [[ $status -eq 0 ]]; then
  echo "bundle up to date: $(wc -c <"$static/widget.js") bytes widget.js, $(wc -c <"$static/widget.css") bytes widget.css"
fi
exit $status
