"""Checks of the browser tests that every front end shares (see tests/test_browser.py).

Each takes the test's ``Session`` (the page, its waits and the kernel) and asserts what a
user of that host must get: arrow keys that stay in the widget, no plotly "Share chart"
button, an accessible widget (axe-core, from ``js/node_modules``), a dark theme that
reaches the plots and the pattern canvases, a restored view (saved widget state, new
kernel) that says it cannot compute until a kernel-backed view takes over, and a static
HTML export that shows the real fit settings and no share button.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from browser_utils import AXE
from conftest import report

# The notebook panel (JupyterLab or Notebook 7) of `path`: its active cell index.
JS_ACTIVE_CELL = """(path) => {
  const w = Array.from(window.jupyterapp.shell.widgets('main')).find(
    (x) => x.context && x.context.path === path && x.content);
  return w ? w.content.activeCellIndex : null;
}"""


def arrow_keys(session, path: str) -> None:
    """→ on the resolution slider changes it; the notebook's active cell stays put."""
    page = session.page
    slider = page.locator(".lw-root .lw-controls input[type=range]")
    before = int(slider.input_value())
    slider.focus()  # (Notebook 7 makes the widget's cell the active one)
    cell = page.evaluate(JS_ACTIVE_CELL, path)
    page.keyboard.press("ArrowRight")
    session.wait(f"() => document.querySelector('.lw-root').landscape().job.shape[0] "
                 f"=== {before + 2}", None, "the grid of the resolution the arrow key set")
    assert int(slider.input_value()) == before + 2
    page.keyboard.press("ArrowDown")  # a notebook shortcut in command mode: here the slider's
    assert int(slider.input_value()) == before
    assert page.evaluate("() => document.activeElement.type") == "range", "focus left"
    assert page.evaluate(JS_ACTIVE_CELL, path) == cell, "the arrow keys moved the notebook"
    out = None
    for _ in range(100):  # the debounced trait update on its way to the kernel
        out = session.execute("print(w.resolution)")
        if int(out) == before:
            break
        page.wait_for_timeout(100)
    assert int(out) == before, out


# Every plotly graph of the widget: its config and the titles of its modebar buttons.
JS_MODEBARS = """() => Array.from(document.querySelectorAll('.lw-root .js-plotly-plot')).map(
  (gd) => ({ cloud: gd._context.showSendToCloud, server: gd._context.plotlyServerURL,
             buttons: Array.from(gd.querySelectorAll('.modebar-btn')).map(
               (b) => b.getAttribute('data-title')) }))"""


def no_share_button(page, at_least: int = 1) -> list[str]:
    """No plotly graph of the widget offers to send its data anywhere."""
    plot = page.locator(".lw-root .lw-plot")
    plot.hover()  # the modebar is drawn on hover
    graphs = page.evaluate(JS_MODEBARS)
    assert len(graphs) >= at_least, graphs
    for g in graphs:
        assert g["cloud"] is False and not g["server"], g
        assert not [b for b in g["buttons"] if "share" in (b or "").lower()], g["buttons"]
    assert page.locator("[data-title*='Share' i], .modebar-btn[data-title*='cloud' i]").count() == 0
    return graphs[0]["buttons"]


def axe_check(page, what: str) -> None:
    """axe-core on the widget: no serious or critical violations."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("""async () => {
      const r = await axe.run(document.querySelector('.lw-root'), { resultTypes: ['violations'] });
      return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.slice(0, 3).map((n) => n.html.slice(0, 160)) }));
    }""")
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not bad, json.dumps(bad, indent=1)
    report(f"axe-core on the widget ({what}): no serious or critical violations"
           + (f"; minor/moderate: {sorted({v['id'] for v in result})}" if result else ""))


def canvas_pixel(page, selector: str, x: int = 1, y: int = 1) -> list[int]:
    return page.evaluate("""([sel, x, y]) => Array.from(document.querySelector(sel)
        .getContext('2d').getImageData(x, y, 1, 1).data)""", [selector, x, y])


def luminance(rgb) -> float:
    return (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255


def parse_rgb(text: str) -> list[float]:
    text = text.strip()
    if text.startswith("#"):
        digits = text[1:]
        if len(digits) in (3, 4):  # #rgb: each digit doubled
            return [int(d * 2, 16) for d in digits[:3]]
        return [int(digits[i:i + 2], 16) for i in (0, 2, 4)]
    return [float(v) for v in text[text.index("(") + 1:text.index(")")].split(",")[:3]]


JS_PLOT_COLOURS = """() => {
  const out = {};
  for (const sel of ['.lw-plot', '.lw-fit-plot']) {
    const gd = document.querySelector('.lw-root ' + sel);
    if (gd && gd._fullLayout) out[sel] = { paper: gd._fullLayout.paper_bgcolor,
      font: gd._fullLayout.font.color, bg: getComputedStyle(gd.closest('.lw-root'))
        .getPropertyValue('--jp-layout-color0').trim() };
  }
  return out;
}"""


def dark_theme(session, artifacts: Path, command: str = "apputils:change-theme") -> None:
    """Switch the host to its dark theme: plots and pattern canvases follow."""
    page = session.page
    page.evaluate(f"""() => window.jupyterapp.commands.execute('{command}',
                      {{ theme: 'JupyterLab Dark' }})""")
    session.wait("""() => {
      const bg = getComputedStyle(document.querySelector('.lw-root'))
        .getPropertyValue('--jp-layout-color0').trim();
      const gd = document.querySelector('.lw-root .lw-plot');
      return document.body.dataset.jpThemeLight === 'false' && bg && gd._fullLayout
        && gd._fullLayout.paper_bgcolor.replace(/\\s/g, '') !== 'rgb(255,255,255)'
        && gd._fullLayout.paper_bgcolor !== '#fff' && gd._fullLayout.paper_bgcolor !== 'white';
    }""", None, "the plot in the dark theme", timeout_ms=30_000)
    page.wait_for_timeout(600)  # the second look of theme.js (the stylesheet settles)
    colours = page.evaluate(JS_PLOT_COLOURS)
    for sel, c in colours.items():
        assert luminance(parse_rgb(c["paper"])) < 0.3, (sel, c)
        assert luminance(parse_rgb(c["font"])) > 0.5, (sel, c)
    # The pattern editor's blank cell (a corner) takes the dark background.
    details = page.locator(".lw-root details.lw-pattern")
    if not details.evaluate("(d) => d.open"):
        page.locator(".lw-root .lw-pattern summary").click()
    px = canvas_pixel(page, ".lw-root canvas.lw-pattern-editor", 3, 3)
    assert luminance(px) < 0.3, px
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.locator(".lw-root").screenshot(path=str(artifacts / "dark-theme.png"))
    report(f"dark theme: plots {sorted(colours)} on {colours['.lw-plot']['paper']} with text "
           f"{colours['.lw-plot']['font']}; pattern canvas background {px[:3]} "
           f"(tests/artifacts/dark-theme.png)")


def pattern_keyboard(session) -> None:
    """The pattern editor from the keyboard: arrows move the cursor, space toggles."""
    page = session.page
    details = page.locator(".lw-root details.lw-pattern")
    if not details.evaluate("(d) => d.open"):
        page.locator(".lw-root .lw-pattern summary").click()
    page.locator(".lw-root .lw-pattern select.lw-pattern-size").select_option("8")
    page.locator(".lw-root .lw-pattern-presets button", has_text="Clear").click()
    canvas = page.locator(".lw-root canvas.lw-pattern-editor")
    canvas.focus()
    home = ["ArrowUp"] * 8 + ["ArrowLeft"] * 8  # the cursor to (0, 0)
    for key in home + ["ArrowDown", "ArrowDown", "ArrowRight", "Space", "ArrowRight",
                       "ArrowRight", "Space", "ArrowUp", "Enter"]:
        page.keyboard.press(key)
    expected = {(2, 1), (2, 3), (1, 3)}
    snap = page.evaluate("() => document.querySelector('.lw-root').pattern()")
    assert snap["drawn"] == len(expected), snap
    out = None
    for _ in range(50):  # the trait update on its way to the kernel
        out = json.loads(session.execute("import json; print(json.dumps(w.pattern))"))
        if {(i, j) for i, r in enumerate(out) for j, v in enumerate(r) if v} == expected:
            break
        page.wait_for_timeout(100)
    assert {(i, j) for i, r in enumerate(out) for j, v in enumerate(r) if v} == expected, out
    page.keyboard.press("Space")  # toggles (1, 3) off again
    assert page.evaluate("() => document.querySelector('.lw-root').pattern().drawn") == 2


def static_export(session, page_factory, root: Path) -> None:
    """The HTML export, opened from disk: the real fit settings, no share button."""
    out = session.execute(f"w.to_html({str(root / 'export.html')!r}); "
                          "import json; print(json.dumps(w.fit_settings))")
    settings = json.loads(out)
    page = page_factory()
    try:
        page.goto((root / "export.html").as_uri(), wait_until="load")
        page.wait_for_function("() => { const gd = document.querySelector('.lw-root .lw-plot');"
                               " return gd && gd._fullLayout; }", timeout=60_000)
        assert page.locator(".lw-root button.lw-compute").is_disabled()
        assert "Static HTML export" in page.locator(".lw-root .lw-status").inner_text()
        no_share_button(page)
        page.locator(".lw-root .lw-pattern summary").click()
        shown = page.locator(".lw-root input.lw-fit-steps").input_value()
        assert int(shown) == settings["steps"], (shown, settings)
    finally:
        page.close()
    report(f"HTML export: fit settings shown as run ({settings}); no share button")


RESTORED = "restored.ipynb"
RESTORED_CODE = """\
import torch
import landscape_widget as lw
torch.manual_seed(0)
w = lw.LandscapeWidget(torch.nn.Linear(4, 3), (torch.randn(64, 4), torch.randint(0, 3, (64,))),
                       resolution=5)
w"""


def write_restored_notebook(path: Path, data_dir: Path) -> None:
    """A notebook saved with the widget's state (as JupyterLab's "save widget state" does).

    Signed as trusted with the server's key in ``data_dir`` (the user's own notebook is: an
    untrusted one shows no widget at all, only its text form).
    """
    import torch
    from ipywidgets.embed import embed_data
    from nbformat.sign import NotebookNotary

    import landscape_widget as lw

    torch.manual_seed(0)
    w = lw.LandscapeWidget(torch.nn.Linear(4, 3),
                           (torch.randn(64, 4), torch.randint(0, 3, (64,))), resolution=5)
    try:
        w.wait(60)
        data = embed_data(views=[w], drop_defaults=False)  # as the front end saves: with _esm
    finally:
        w.close()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(RESTORED_CODE)
    cell.outputs = [nbformat.v4.new_output(
        "display_data", data={"application/vnd.jupyter.widget-view+json": data["view_specs"][0],
                              "text/plain": "LandscapeWidget(...)"})]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": data["manager_state"]}
    data_dir.mkdir(parents=True, exist_ok=True)
    NotebookNotary(data_dir=str(data_dir)).sign(nb)
    nbformat.write(nb, path)


def restored_view(session, url: str, run_all) -> None:
    """A view from saved widget state with a new kernel: off, says why; a re-run revives."""
    page = session.page
    page.goto(url, wait_until="domcontentloaded")
    session.wait("""() => { const r = document.querySelector('.lw-root');
                      const s = r && r.landscape && r.landscape();
                      return s && s.job && s.job.complete && s.offline; }""",
                 None, "the restored view, offline")
    for sel in ["button.lw-compute", "input[type=range]", "button.lw-fit"]:
        assert page.locator(f".lw-root {sel}").is_disabled(), sel
    note = page.locator(".lw-root .lw-offline-note").inner_text()
    assert "No answer from a kernel" in note and "run the cell again" in note, note
    run_all()
    session.wait("""() => { const r = document.querySelector('.lw-root');
                      const s = r && r.landscape && r.landscape();
                      return s && !s.offline && s.job && s.job.complete
                        && s.status.startsWith('done:'); }""",
                 None, "a kernel-backed view in the restored notebook's place")
    assert not page.locator(".lw-root button.lw-compute").is_disabled()
    assert page.locator(".lw-root .lw-offline-note").count() == 0
    report("restored view (saved widget state, new kernel): compute, slider and Fit disabled "
           "with the reason shown; live again after the cell ran")
