"""The compare panel in a real browser: the static HTML export opened in Debian's chromium.

The export carries the compare traits (arrays as base64), so no Jupyter server is needed:
the page shows the first model, the radio button flips to the second on the same colour
levels, and "side by side" shows both on one coloraxis. The values plotly draws are
compared with the surfaces computed in Python (log10 of the loss). Like test_browser.py, a
missing chromium/playwright is reported as not run (a failure with ``CI=true``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from browser_utils import launch_chromium, require_playwright

import landscape_widget as lw
from landscape_widget.models import resnet

JS_SNAP = "() => document.querySelector('.lw-root').compare()"
JS_Z = """(k) => {
  const t = document.querySelector('.lw-compare-plot').data[k];
  return { name: t.name, z: t.z };
}"""


def test_toggle_and_side_by_side_show_each_surface_on_one_scale(tmp_path):
    sync_playwright = require_playwright()
    x, y = lw.datasets.digits_images("train")
    models = {"resnet8": resnet(8, shortcut=True, in_channels=1, base=4, seed=0).eval(),
              "resnet8-noshort": resnet(8, shortcut=False, in_channels=1, base=4,
                                        seed=0).eval()}
    w = lw.LandscapeWidget(models=models, data=(x[:64], y[:64]), autostart=False,
                           resolution=7)
    try:
        surfaces = w.compare(wait=True, timeout=120) and w.compared
        w.compare_shown = "resnet8"
        page_file = tmp_path / "compare.html"
        w.to_html(page_file)
        zmin, zmax = w.compare_result["zmin"], w.compare_result["zmax"]
    finally:
        w.close()
    with sync_playwright() as pw:
        context = launch_chromium(pw, Path(tempfile.mkdtemp(dir=tmp_path)))
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            page.wait_for_function(
                "() => { const r = document.querySelector('.lw-root');"
                " return r && r.compare && r.compare().draws > 0; }", timeout=60_000)

            def shown(k: int = 0):
                got = page.evaluate(JS_Z, k)
                return got["name"], np.array(got["z"], dtype=float)

            page.click(".lw-compare summary")  # the panel opens like the pattern editor
            first = page.evaluate(JS_SNAP)
            assert first["shown"] == ["resnet8"] and first["zmin"] == pytest.approx(zmin)
            name, z = shown()
            np.testing.assert_allclose(z, np.log10(surfaces["resnet8"].loss), rtol=1e-5)
            page.locator(".lw-compare-shown input[value='resnet8-noshort']").check()
            page.wait_for_function(f"() => ({JS_SNAP})().shown[0] === 'resnet8-noshort'")
            second = page.evaluate(JS_SNAP)
            name, z = shown()
            assert name == "resnet8-noshort"
            np.testing.assert_allclose(z, np.log10(surfaces["resnet8-noshort"].loss),
                                       rtol=1e-5)
            page.select_option(".lw-compare-layout", "side")
            page.wait_for_function(f"() => ({JS_SNAP})().shown.length === 2")
            side = page.evaluate(JS_SNAP)
            levels = [math.log10(zmin), math.log10(zmax)]
            for snap in (first, second, side):
                for trace in snap["traces"]:
                    assert trace["zrange"] == pytest.approx(levels)  # one scale for all
            assert [t["name"] for t in side["traces"]] == list(models)
            assert errors == []
        finally:
            context.close()
