"""Render docs/pattern.png: the widget's pattern editor after a fit, in headless Chromium.

The widget's static HTML export (``w.to_html``) is opened with playwright in Debian's
chromium and the pattern panel is screenshotted.
Run: ``.venv/bin/python docs/make_pattern_image.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import landscape_widget as lw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from browser_utils import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def main() -> None:
    """Fit the letter A on the digits MLP and screenshot the panel."""
    torch.manual_seed(0)
    train, test = lw.datasets.digits("train"), lw.datasets.digits("test")
    model, _ = lw.demo.trained_mlp(seed=0)
    w = lw.LandscapeWidget(model, train, test_data=test, autostart=False, show_pattern=True,
                           model_fn=lambda: lw.demo.mlp(seed=None))
    w.fit_pattern(lw.text_mask("A", 10, 10), steps=1500, every=100)
    w.wait_fit(600)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        page_path = Path(tmp) / "pattern.html"
        w.to_html(page_path, title="pattern editor")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(page_path.as_uri())
            page.wait_for_function("() => { const p = document.querySelector('.lw-fit-plot');"
                                   " return p && p.data && p.data.length > 0; }")
            page.locator(".lw-pattern").screenshot(path=str(HERE / "pattern.png"))
            browser.close()
    w.close()
    print(HERE / "pattern.png", w.pattern_fit)


if __name__ == "__main__":
    main()
