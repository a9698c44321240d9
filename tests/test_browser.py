"""The widget in real browsers: JupyterLab 4 and Notebook 7 in Debian's headless Chromium.

The test starts its own JupyterLab on 127.0.0.1 (free port, random token, temporary root
and Jupyter directories), opens a generated notebook with ``?reset``, runs all cells from
the Run menu and then drives the widget's own controls as a user would:

1. the grid shown by plotly fills in to a complete 21×21 of finite values, equal to the
   kernel's ``w.surface``;
2. the resolution slider moves to 41 and a new complete 41×41 grid arrives;
3. three computations with new seeds, started by the Compute button, measure the time from
   the compute message to the first tile drawn (``performance.now()`` in the page, from the
   front end's ``landscape()`` hook) — printed, not asserted tightly;
4. a 201×201 computation is cancelled with the Cancel button after its first tile: the
   status line says cancelled, the kernel answers and reports ``cancelled``;
5. the curvature view: "compute: curvature" draws the 3x3 |λmin/λmax| map, equal to the
   kernel's;
6. the pattern editor: cells are painted with the mouse (clicks and a drag stroke), the
   kernel's ``w.mask`` and ternary preview agree with what was painted, Fit starts an MPO
   fit whose heatmap changes on screen with at least two live updates, Stop stops it and
   Resume continues from the step it reached;
7. the plane through three models (the widget's ``models=``), picked in the direction
   select: a carpet and contourcarpet on the triangle with the three models marked and
   named, finite inside the region, equal to the kernel's ``TriangleSurface``;
8. curve-shape types picked in the direction select: "permutation (w-basin)" switches the
   view to the 1D taxonomy window, and the curve's label and its minima and maxima are
   drawn, as the kernel's ``lw.classify_curve`` of ``w.surface`` finds them; then
   "mined: w-peak", whose mining steps show in the status line before its curve;
9. every host's needs (tests/browser_checks.py): → and ↓ on the slider stay in the widget
   (the notebook's active cell does not move), no plotly "Share chart" button, axe-core
   finds no serious or critical violation, the pattern editor works from the keyboard, the
   HTML export shows the real fit settings, the dark theme reaches the plots and canvases
   (tests/artifacts/dark-theme.png), and a view restored from saved widget state with a
   new kernel is disabled and says why until the re-run cell's view takes over.

``test_widget_in_notebook7`` runs Notebook 7 (its own server and port): render, compute,
cancel and the arrow keys.

Screenshots go to ``tests/artifacts/`` (gitignored). JupyterLab, its kernel and the browser
are shut down in ``finally`` blocks, and the test checks that the kernel process is gone.
``make test`` installs chromium and axe-core first where it can (.ci/browser-deps). Where
it cannot (no root, no sudo, no npm), the tests report loudly in the summary that they did
not run, why, and the fix; in CI (``CI=true``) a missing piece is a failure, never a skip.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import browser_checks as checks
import nbformat
import numpy as np
from browser_utils import (
    JupyterLab,
    launch_chromium,
    pid_alive,
    require_playwright,
    session_pids,
)
from conftest import report

import landscape_widget as lw
from landscape_widget.experiments.permute import PERMUTATION_X
from landscape_widget.widget.fit_spec import LIMITS as FIT_LIMITS
from landscape_widget.widget.widget import DEBOUNCE_S

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
NOTEBOOK = "widget_test.ipynb"
WAIT_MS = 120_000  # the longest any single wait may take
TIMING_RUNS = 3
SEED_BOX = ".lw-root .lw-controls input[type=number][min='0']"
RES_BOX = ".lw-root .lw-controls input[type=number][min='2']"

CELLS = [
    """\
import torch
torch.set_num_threads(1)  # two cores, shared with the browser and the server
import numpy as np
import landscape_widget as lw

model, (X, y) = lw.demo.trained_mlp(seed=0)  # the quickstart's MLP 64-32-10, 1400 digits
models = {"adam": model, "sgd": lw.demo.trained_mlp(seed=0, optimizer="sgd", lr=0.1)[0],
          "adam (seed 1)": lw.demo.trained_mlp(seed=1)[0]}  # the corners of step 7's plane""",
    """\
w = lw.LandscapeWidget(model, (X, y), models=models, resolution=21,
                       test_data=lw.datasets.digits("test"))
w""",
]

# Run in the kernel before a computation that the test cancels: the kernel's stream of
# that grid holds after its first tile until the job's cancel event is set (or 120 s pass),
# so the grid cannot finish before the Cancel click lands. Without it the test raced the
# kernel: on a loaded CI machine the browser drew the first tile 3.3 s late and the
# 201x201 grid finished first. The release is recorded: the test asserts it was the
# cancel, not the time-out, that let the stream go on.
HOLD_AFTER_FIRST_TILE = """\
import landscape_widget.widget.grid_job as _gj
_open_stream, _released = _gj.open_stream, []

class _HeldStream:
    def __init__(self, stream, cancel):
        self._stream, self._cancel = stream, cancel
    def __getattr__(self, name):
        return getattr(self._stream, name)
    def __iter__(self):
        for i, tile in enumerate(self._stream):
            yield tile
            if i == 0:
                _released.append(self._cancel.wait(120))

def _held_open_stream(ctx, job, dirs):
    stream = _open_stream(ctx, job, dirs)
    return _HeldStream(stream, job.cancel) if stream.total == 201 * 201 else stream

_gj.open_stream = _held_open_stream"""
RELEASE_HOLD = "_gj.open_stream = _open_stream; print(_released)"  # later grids run unheld

# JavaScript run in the page. ROOT: the widget view; its `landscape()` hook gives a
# snapshot of the view's state (see js/src/widget.js).
JS_STATE = """() => {
  const root = document.querySelector('.lw-root');
  return root && root.landscape ? root.landscape() : null;
}"""

# The grid plotly shows: data[0].z of the graph div, with a count of its finite values.
JS_PLOT = """() => {
  const plot = document.querySelector('.lw-root .lw-plot');
  const trace = plot && plot.data && plot.data[0];
  if (!trace || !Array.isArray(trace.z)) return null;
  const z = trace.z;
  const finite = z.reduce((n, row) => n + row.filter(Number.isFinite).length, 0);
  return { type: trace.type, ny: z.length, nx: z.length ? z[0].length : 0, finite, z };
}"""

# True once plotly shows n x n finite values.
JS_PLOT_FINITE = """(n) => {
  const plot = document.querySelector('.lw-root .lw-plot');
  const z = plot && plot.data && plot.data[0] && plot.data[0].z;
  return Array.isArray(z) && z.length === n
    && z.every((row) => row.length === n && row.every(Number.isFinite));
}"""

# True once job `id` (or any job when id is null) of shape n x n is complete, plotly shows
# n x n finite values, and the time its first tile was drawn is known.
JS_FULL_GRID = """([n, id]) => {
  const root = document.querySelector('.lw-root');
  if (!root || !root.landscape) return false;
  const s = root.landscape();
  if (!s.job || !s.job.complete || s.job.shape.join('x') !== `${n}x${n}`) return false;
  if (id !== null && s.job.id !== id) return false;
  const t = s.timings[s.job.id];  // its first tile drawn: the timing is recorded a frame later
  if (t && t.firstTile !== null && t.firstDraw === null) return false;
  const plot = root.querySelector('.lw-plot');
  const trace = plot && plot.data && plot.data[0];
  if (!trace || !Array.isArray(trace.z) || trace.z.length !== n) return false;
  return trace.z.every((row) => row.length === n && row.every(Number.isFinite));
}"""

# The notebook panel and its kernel, through the app object JupyterLab exposes with
# --LabApp.expose_app_in_browser.
JS_PANEL = """(path) => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return null;
  return Array.from(app.shell.widgets('main')).find(
    (w) => w.context && w.context.path === path && w.sessionContext) || null;
}"""

JS_KERNEL_IDLE = f"""(path) => {{
  const panel = ({JS_PANEL})(path);
  const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle' && kernel.connectionStatus === 'connected';
}}"""

# Execute code in the notebook's kernel (as a second client would) and collect its output.
JS_EXECUTE = f"""async ([path, code, ms]) => {{
  const panel = ({JS_PANEL})(path);
  const kernel = panel.sessionContext.session.kernel;
  const future = kernel.requestExecute({{ code, store_history: false }});
  let out = '';
  future.onIOPub = (msg) => {{
    const c = msg.content;
    if (msg.header.msg_type === 'stream') out += c.text;
    if (msg.header.msg_type === 'error') out += `${{c.ename}}: ${{c.evalue}}`;
  }};
  const timeout = new Promise((resolve) => setTimeout(() => resolve(null), ms));
  const reply = await Promise.race([future.done, timeout]);
  return {{ status: reply ? reply.content.status : 'timeout', out }};
}}"""


def _write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nbformat.write(nb, path)


class Session:
    """The page, with waits bounded by ``WAIT_MS`` and the log of what went on in it."""

    def __init__(self, page, path: str = NOTEBOOK):
        self.page, self.path = page, path
        self.log: list[str] = []
        page.on("console", lambda m: self.log.append(f"console.{m.type}: {m.text}"))
        page.on("pageerror", self._page_error)
        self.host_errors: list[str] = []

    # Notebook 7.6 throws one TypeError of its own while loading its settings ("reading
    # 'schema'", all frames in its notebook_core bundle), before any widget exists: that
    # one is the host's, not the widget's.
    HOST_BUNDLES = ("/static/notebook/notebook_core.",)

    def _page_error(self, err) -> None:
        frames = [ln for ln in (getattr(err, "stack", "") or "").splitlines()[1:]
                  if "http" in ln]  # the frames with a script (not "async Promise.all")
        if frames and all(any(b in f for b in self.HOST_BUNDLES) for f in frames):
            self.host_errors.append(str(err))
        else:
            self.log.append(f"pageerror: {err}")

    def wait(self, js: str, arg=None, what: str = "", timeout_ms: int = WAIT_MS):
        try:
            return self.page.wait_for_function(js, arg=arg, timeout=timeout_ms, polling=100)
        except Exception as err:
            raise AssertionError(f"timed out waiting for {what}: {err}\nwidget state: "
                                 f"{self.state()}") from None

    def state(self) -> dict | None:
        return self.page.evaluate(JS_STATE)

    def plot(self) -> dict | None:
        return self.page.evaluate(JS_PLOT)

    def execute(self, code: str, ms: int = 60_000) -> str:
        reply = self.page.evaluate(JS_EXECUTE, [self.path, code, ms])
        assert reply["status"] == "ok", f"kernel did not run {code!r}: {reply}"
        return reply["out"]

    def set_input(self, selector: str, value, events=("input", "change")) -> None:
        """Set an input of the widget and fire the events a user's edit fires."""
        self.page.locator(selector).evaluate(
            """(el, [value, events]) => {
                 el.value = String(value);
                 for (const ev of events) el.dispatchEvent(new Event(ev, { bubbles: true }));
               }""",
            [value, list(events)],
        )

    def full_grid(self, n: int, job_id: str | None = None, what: str = "") -> dict:
        self.wait(JS_FULL_GRID, [n, job_id], what or f"a complete {n}x{n} grid")
        state = self.state()
        grid = self.plot()
        assert (grid["ny"], grid["nx"], grid["finite"]) == (n, n, n * n), grid
        return state

    def compute(self) -> str:
        """Press Compute; returns the id of the computation it asked for."""
        before = set(self.state()["timings"])
        self.page.locator(".lw-root button.lw-compute").click()
        self.wait("""(before) => Object.entries(
                       document.querySelector('.lw-root').landscape().timings)
                       .some(([id, t]) => !before.includes(id) && t.source === 'compute')""",
                  sorted(before), "the compute message")
        new = [i for i, t in self.state()["timings"].items()
               if i not in before and t["source"] == "compute"]
        return new[-1]


def _print_logs(session, server, name: str) -> None:
    """The browser's and the server's last lines, for a failed test's report."""
    if session is not None:
        print("\n".join(["--- browser log ---", *session.log[-40:]]))
    print(f"--- {name} log ---\n" + server.tail())


def _assert_server_gone(server, kernel_pid: int | None, what: str) -> None:
    """The kernel ends with its server, and none of the server's processes is left."""
    deadline = time.monotonic() + 15
    while kernel_pid is not None and pid_alive(kernel_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernel_pid is None or not pid_alive(kernel_pid), f"the kernel outlived {what}"
    assert server.pid is None or not session_pids(server.pid), "processes left behind"


def _kernel_surface(session: Session) -> np.ndarray:
    out = session.execute("import json; print(json.dumps(np.asarray(w.wait(60).loss, "
                          "dtype=np.float32).tolist()))")
    return np.array(json.loads(out), dtype=np.float32)


def _run_all(page) -> None:
    """Run > Run All Cells, from the menu bar (JupyterLab and Notebook 7 alike)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def test_widget_in_jupyterlab(tmp_path):
    sync_playwright = require_playwright()
    t_start = time.perf_counter()
    ARTIFACTS.mkdir(exist_ok=True)
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / NOTEBOOK)
    lab = JupyterLab(root, tmp_path / "jupyter", ARTIFACTS / "jupyterlab.log")
    checks.write_restored_notebook(root / checks.RESTORED, lab.home / "data")
    kernel_pid = None
    session = None
    try:
        lab.start(timeout=120)
        with sync_playwright() as pw:
            context = launch_chromium(pw, tmp_path / "chromium-profile")
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(WAIT_MS)
                session = Session(page)
                page.goto(lab.url(f"/lab/tree/{NOTEBOOK}", "reset"),
                          wait_until="domcontentloaded", timeout=WAIT_MS)
                session.wait(JS_KERNEL_IDLE, NOTEBOOK, "the notebook's kernel")
                kernel_pid = int(session.execute("import os; print(os.getpid())"))
                _run_all(page)

                # 1. The initial grid, computed at once by the widget.
                session.full_grid(21, what="the initial 21x21 grid")
                kernel = _kernel_surface(session)
                shown = np.array(session.plot()["z"], dtype=np.float32)
                np.testing.assert_allclose(shown, kernel, rtol=1e-6)
                checks.arrow_keys(session, NOTEBOOK)  # 21 -> 23 -> 21, the cell stays
                checks.no_share_button(page)

                # 2. The resolution slider: 21 -> 41 (the 441 points computed are reused).
                session.set_input(".lw-root .lw-controls input[type=range]", 41)
                state = session.full_grid(41, what="the 41x41 grid after moving the slider")
                assert "reused" in state["status"], state["status"]
                t = state["timings"][state["job"]["id"]]
                assert t["source"] == "controls", t
                slider_ms = t["firstDraw"] - t["sent"]
                assert page.locator(RES_BOX).input_value() == "41"
                np.testing.assert_allclose(np.array(session.plot()["z"], dtype=np.float32),
                                           _kernel_surface(session), rtol=1e-6)
                page.locator(".lw-root").screenshot(path=str(ARTIFACTS / "widget.png"))
                page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"))

                # 3. Time from the compute request to the first tile on screen.
                first_tile, first_draw = [], []
                for seed in range(1, TIMING_RUNS + 1):
                    session.set_input(SEED_BOX, seed, ("change",))
                    job_id = session.compute()
                    state = session.full_grid(41, job_id, f"the 41x41 grid of seed {seed}")
                    t = state["timings"][job_id]
                    first_tile.append(t["firstTile"] - t["sent"])
                    first_draw.append(t["firstDraw"] - t["sent"])
                report(f"time from compute request to first tile on screen (41x41, "
                      f"MLP 64-32-10, 1400 digits, CPU): median "
                      f"{statistics.median(first_draw):.0f} ms of "
                      f"{', '.join(f'{x:.0f}' for x in first_draw)} ms "
                      f"(tile message in after {statistics.median(first_tile):.0f} ms); "
                      f"after the slider: {slider_ms:.0f} ms (with the kernel's "
                      f"{DEBOUNCE_S * 1000:.0f} ms debounce)")

                # 4. A 201x201 computation, cancelled after its first tile.
                session.execute(HOLD_AFTER_FIRST_TILE)
                session.set_input(SEED_BOX, 99, ("change",))
                session.set_input(RES_BOX, 201, ("change",))
                big = session.compute()
                session.wait("""(id) => { const s = document.querySelector('.lw-root').landscape();
                                  return !!s.timings[id] && s.timings[id].firstDraw !== null; }""",
                             big, "the first tile of the 201x201 grid")
                t_cancel = time.perf_counter()
                page.locator(".lw-root button.lw-cancel").click()
                session.wait("""(id) => { const s = document.querySelector('.lw-root').landscape();
                                  return s.job && s.job.id === id && s.job.ended; }""",
                             big, "the 201x201 grid to end")
                cancel_s = time.perf_counter() - t_cancel
                state = session.state()
                assert not state["job"]["complete"], f"finished before the cancel landed: {state}"
                assert "cancelled" in state["status"], state["status"]
                assert state["job"]["known"] < 201 * 201, state
                # The partial grid stays on screen, points not computed filled in coarse.
                session.wait(JS_PLOT_FINITE, 201, "the cancelled grid on screen")
                out = session.execute("print(w.status['state'], w.busy, w.surface.loss.shape, "
                                      "int(np.isnan(w.surface.loss).sum()) > 0)")
                assert out.split() == ["cancelled", "False", "(201,", "201)", "True"], out
                # Every held 201x201 stream (the debounced one the Compute superseded, and
                # this one) went on because it was cancelled, not because the hold timed out.
                released = session.execute(RELEASE_HOLD)
                assert released.strip() not in ("[]", "") and "False" not in released, released
                page.screenshot(path=str(ARTIFACTS / "cancelled.png"))
                print(f"cancelled the 201x201 grid after {state['job']['known']} points; "
                      f"status line updated {cancel_s:.2f} s after the click")
                _curvature_view(session, page)
                _pattern_editor(session, page)
                _plane_view(session, page)
                _curve_shape(session, page)
                checks.pattern_keyboard(session)
                checks.axe_check(page, "JupyterLab, light theme")
                checks.no_share_button(page, at_least=2)  # the plot and the fit heatmap
                checks.static_export(session, context.new_page, root)
                checks.dark_theme(session, ARTIFACTS)
                errors = [e for e in session.log if e.startswith("pageerror")]
                assert not errors, errors
                # A notebook saved with widget state, opened with a new kernel.
                page.evaluate("() => window.jupyterapp.commands.execute('application:close-all')")
                restored = Session(page, checks.RESTORED)
                checks.restored_view(restored, lab.url(f"/lab/tree/{checks.RESTORED}", "reset"),
                                     lambda: (restored.wait(JS_KERNEL_IDLE, checks.RESTORED,
                                                            "the restored notebook's kernel"),
                                              _run_all(page)))
            finally:
                context.close()
    except BaseException:
        _print_logs(session, lab, "jupyterlab")
        raise
    finally:
        lab.stop()
    _assert_server_gone(lab, kernel_pid, "JupyterLab")
    report(f"JupyterLab browser test took {time.perf_counter() - t_start:.1f} s")


def test_widget_in_notebook7(tmp_path):
    """Notebook 7: render, compute, cancel, the arrow keys, no share button."""
    sync_playwright = require_playwright()
    t_start = time.perf_counter()
    ARTIFACTS.mkdir(exist_ok=True)
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / NOTEBOOK)
    server = JupyterLab(root, tmp_path / "jupyter", ARTIFACTS / "notebook7.log", app="notebook")
    kernel_pid = None
    session = None
    try:
        server.start(timeout=120)
        with sync_playwright() as pw:
            context = launch_chromium(pw, tmp_path / "chromium-profile")
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(WAIT_MS)
                session = Session(page)
                page.goto(server.url(f"/notebooks/{NOTEBOOK}"), wait_until="domcontentloaded",
                          timeout=WAIT_MS)
                session.wait(JS_KERNEL_IDLE, NOTEBOOK, "the notebook's kernel")
                kernel_pid = int(session.execute("import os; print(os.getpid())"))
                _run_all(page)
                session.full_grid(21, what="the initial 21x21 grid")
                np.testing.assert_allclose(np.array(session.plot()["z"], dtype=np.float32),
                                           _kernel_surface(session), rtol=1e-6)
                checks.arrow_keys(session, NOTEBOOK)
                checks.no_share_button(page)
                session.set_input(SEED_BOX, 5, ("change",))
                job_id = session.compute()
                session.full_grid(21, job_id, "the 21x21 grid of seed 5")
                session.execute(HOLD_AFTER_FIRST_TILE)
                session.set_input(RES_BOX, 201, ("change",))
                big = session.compute()
                session.wait("""(id) => { const s = document.querySelector('.lw-root').landscape();
                                  return !!s.timings[id] && s.timings[id].firstDraw !== null; }""",
                             big, "the first tile of the 201x201 grid")
                page.locator(".lw-root button.lw-cancel").click()
                session.wait("""(id) => { const s = document.querySelector('.lw-root').landscape();
                                  return s.job && s.job.id === id && s.job.ended; }""",
                             big, "the 201x201 grid to end")
                state = session.state()
                assert not state["job"]["complete"] and "cancelled" in state["status"], state
                out = session.execute("print(w.status['state'], w.busy)")
                assert out.split() == ["cancelled", "False"], out
                released = session.execute(RELEASE_HOLD)
                assert released.strip() not in ("[]", "") and "False" not in released, released
                page.screenshot(path=str(ARTIFACTS / "notebook7.png"))
                errors = [e for e in session.log if e.startswith("pageerror")]
                assert not errors, errors
            finally:
                context.close()
    except BaseException:
        _print_logs(session, server, "notebook")
        raise
    finally:
        server.stop()
    _assert_server_gone(server, kernel_pid, "the server")
    report(f"Notebook 7: rendered, computed, cancelled, arrow keys kept (host's own page "
           f"errors: {session.host_errors if session else []}); browser test took "
           f"{time.perf_counter() - t_start:.1f} s")


JS_PATTERN = """() => document.querySelector('.lw-root').pattern()"""
FIT_STEPS = FIT_LIMITS["steps"][1]
JS_FIT_Z = """() => {
  const plot = document.querySelector('.lw-root .lw-fit-plot');
  const t = plot && plot.data && plot.data[0];
  return t && Array.isArray(t.z) ? t.z : null;
}"""


def _pattern_editor(session: Session, page) -> None:
    """Step 5: paint a pattern by mouse, fit it, watch the heatmap stream, stop, resume."""
    page.locator(".lw-root .lw-pattern summary").click()
    page.locator(".lw-root .lw-pattern select.lw-pattern-size").select_option("8")
    canvas = page.locator(".lw-root canvas.lw-pattern-editor")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    cell = box["width"] / 8

    def at(i, j):
        return box["x"] + (j + 0.5) * cell, box["y"] + (i + 0.5) * cell

    painted = np.zeros((8, 8), int)
    for i, j in [(1, 1), (1, 6), (6, 1), (6, 6)]:  # four clicks
        page.mouse.click(*at(i, j))
        painted[i, j] = 1
    page.mouse.move(*at(4, 1))  # a drag stroke along row 4
    page.mouse.down()
    for j in range(1, 7):
        page.mouse.move(*at(4, j), steps=3)
        painted[4, j] = 1
    page.mouse.up()
    page.mouse.click(*at(1, 1))  # a click on a drawn cell erases it
    painted[1, 1] = 0
    snap = session.page.evaluate(JS_PATTERN)
    assert (snap["rows"], snap["drawn"]) == (8, int(painted.sum())), snap
    # The last stroke's trait update may still be on its way to the kernel.
    deadline = time.monotonic() + 30
    while True:
        out = session.execute("import json; print(json.dumps([w.mask.tolist(), "
                              "lw.ternary_mask(w.mask).tolist()]))")
        mask, ternary = json.loads(out)
        if np.array_equal(mask, painted) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    np.testing.assert_array_equal(mask, painted)
    assert snap["ternary"] == np.ravel(ternary).tolist()

    # As many steps as the control allows: the fit must still run when Stop lands, and
    # the browser of a loaded CI machine draws its updates late (see HOLD_AFTER_FIRST_TILE).
    session.set_input(".lw-root input.lw-fit-steps", FIT_STEPS, ("change",))
    page.locator(".lw-root button.lw-fit").click()
    session.wait("() => document.querySelector('.lw-root').pattern().updates >= 1", None,
                 "the first heatmap of the fit")
    first = page.evaluate(JS_FIT_Z)
    session.wait("() => document.querySelector('.lw-root').pattern().updates >= 3", None,
                 "two more live heatmap updates")
    later = page.evaluate(JS_FIT_Z)
    assert np.array(first).shape == (8, 8) and not np.allclose(first, later), "heatmap unchanged"
    page.locator(".lw-root button.lw-fit-stop").click()
    session.wait("() => document.querySelector('.lw-root').pattern().done", None, "the stop")
    stopped = page.evaluate(JS_PATTERN)["step"]
    assert 0 < stopped < FIT_STEPS
    status = page.locator(".lw-root .lw-fit-status").inner_text()
    assert "stopped" in status and "acc_diff train" in status and "test" in status, status
    page.locator(".lw-root .lw-pattern").screenshot(path=str(ARTIFACTS / "pattern.png"))
    session.set_input(".lw-root input.lw-fit-steps", 20, ("change",))
    page.locator(".lw-root button.lw-fit-resume").click()
    session.wait(f"() => {{ const p = document.querySelector('.lw-root').pattern(); "
                 f"return p.done && p.step === {stopped + 20}; }}", None, "the resumed fit")
    out = session.execute("print(w.pattern_fit.step, w.fit_status['state'])")
    assert out.split() == [str(stopped + 20), "done"], out
    report(f"pattern editor: {page.evaluate(JS_PATTERN)['updates']} live heatmap updates; "
           f"stopped at step {stopped}, resumed to {stopped + 20}")


def _curvature_view(session: Session, page) -> None:
    """Step 5: the Hessian eigenvalue-ratio map through the 'compute' select."""
    session.set_input(SEED_BOX, 0, ("change",))
    page.locator(".lw-root .lw-controls select").first.select_option("curvature")
    session.set_input(RES_BOX, 3, ("change",))
    session.wait("""() => { const s = document.querySelector('.lw-root').landscape();
                      const p = document.querySelector('.lw-root .lw-plot');
                      return s.job && s.job.complete && s.job.shape.join() === '3,3'
                        && s.drawn && s.drawn.id === s.job.id && s.drawn.complete
                        && p.data[0].colorbar.title.text === '|λmin/λmax|'; }""",
                 None, "the 3x3 curvature map")
    shown = np.array(session.plot()["z"], dtype=np.float32)
    out = session.execute("print(json.dumps(np.asarray(w.wait(120).loss, "
                          "dtype=np.float32).tolist()), w.surface.spec['quantity'])")
    values, quantity = out.rsplit(" ", 1)
    assert quantity.strip() == "curvature"
    np.testing.assert_allclose(shown, np.array(json.loads(values), dtype=np.float32),
                               rtol=1e-6)
    assert np.isfinite(shown).all() and (shown >= 0).all()
    page.locator(".lw-root .lw-controls select").first.select_option("loss")


# The plane on screen, once the complete n x n lattice is drawn (not a coarse-to-fine
# frame of it): the contourcarpet's grid, how many of its values are finite and how many
# lie in the region, and the named markers.
JS_PLANE = """(n) => {
  const root = document.querySelector('.lw-root');
  const s = root.landscape();
  const data = root.querySelector('.lw-plot').data || [];
  const cc = data.find((t) => t.type === 'contourcarpet');
  if (!s.job || !s.drawn || s.drawn.id !== s.job.id || !s.drawn.complete) return null;
  if (!cc || cc.z.length !== n) return null;
  const margin = -cc.a[0];
  let finite = 0;
  let inside = 0;
  cc.z.forEach((row, j) => row.forEach((v, i) => {
    if (cc.a[i] + cc.b[j] <= 1 + margin + 1e-6) inside += 1;
    if (Number.isFinite(v)) finite += 1;
  }));
  const named = data.filter((t) => t.type === 'scatter' && Array.isArray(t.text));
  return { types: data.map((t) => t.type), z: cc.z, finite, inside,
           markers: named.map((t) => ({ mode: t.mode, text: t.text, x: t.x, y: t.y })) };
}"""


def _plane_view(session: Session, page) -> None:
    """Step 7: the plane through the widget's three models, from the direction select."""
    page.locator(".lw-root .lw-controls select[title='Direction type']").select_option(
        label="plane through three models")
    session.set_input(RES_BOX, 10, ("change",))  # 10 steps per unit, margin 0.2: 17 x 17
    shown = session.wait(JS_PLANE, 17, "the plane through three models").json_value()
    assert shown["types"][:2] == ["carpet", "contourcarpet"], shown["types"]
    out = session.execute("s = w.wait(60); print(json.dumps([type(s).__name__, s.names, "
                          "np.asarray(s.loss, dtype=np.float32).tolist()]))")
    kind, names, loss = json.loads(out)
    assert kind == "TriangleSurface" and names == ["adam", "sgd", "adam (seed 1)"]
    markers = [m for m in shown["markers"] if m["mode"] == "markers"]
    assert len(markers) == 1 and markers[0]["text"] == names, shown["markers"]
    np.testing.assert_allclose(markers[0]["x"], [1, 0.5, 0], atol=1e-12)
    assert shown["finite"] == shown["inside"] > 100, (shown["finite"], shown["inside"])
    z = np.array(shown["z"], dtype=float)
    np.testing.assert_allclose(z, np.array(loss, dtype=float), rtol=1e-6, equal_nan=True)
    page.locator(".lw-root .lw-pattern summary").click()  # fold the editor of step 6 away
    # plotly paints the SVG after plot.data is set: let two frames pass before the picture.
    page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.locator(".lw-root").screenshot(path=str(ARTIFACTS / "plane.png"))
    report(f"plane through three models: {shown['inside']} points of a 17x17 lattice drawn "
           f"on the triangle, models {', '.join(names)}")


# The labelled curve on screen, once the complete 61-point curve is drawn with its label:
# the annotation (data and SVG), the extremum markers (data, and their SVG points).
JS_CURVE = """([previous, num]) => {
  const root = document.querySelector('.lw-root');
  const s = root.landscape();
  if (!s.job || !s.job.complete || s.job.shape.join() !== String(num) || !s.job.curve) return null;
  if (s.job.id === previous) return null;
  if (!s.drawn || s.drawn.id !== s.job.id || !s.drawn.complete) return null;
  const plot = root.querySelector('.lw-plot');
  const notes = (plot.layout && plot.layout.annotations) || [];
  const note = notes.find((a) => a.name === 'curve shape');
  const svgNote = plot.querySelector('g.annotation text');
  if (!note || !svgNote) return null;
  const trace = (name) => plot.data.find((t) => t.name === name) || { x: [], y: [] };
  const points = (name) => {
    const i = plot.data.findIndex((t) => t.name === name);
    const layer = plot.querySelectorAll('.scatterlayer .trace')[i];
    return i < 0 || !layer ? 0 : layer.querySelectorAll('path.point').length;
  };
  return { id: s.job.id, label: s.job.curve, text: note.text, hover: note.hovertext,
           svg: svgNote.textContent,
           minima: trace('minima').x, maxima: trace('maxima').x, minLoss: trace('minima').y,
           drawnMin: points('minima'), drawnMax: points('maxima') };
}"""


# Every text the status line shows from now on (mining may be over between two polls).
JS_WATCH_STATUS = """() => {
  const node = document.querySelector('.lw-root .lw-status');
  window.lwStatusSeen = [];
  new MutationObserver(() => window.lwStatusSeen.push(node.textContent))
    .observe(node, { childList: true, subtree: true, characterData: true });
}"""


def _shown_curve(session: Session, previous: str | None, what: str,
                 window: tuple = lw.SHAPE_X) -> dict:
    """The labelled curve on screen, checked against the kernel's classification.

    ``window``: the ``(start, stop, num)`` the front end sets for this direction type (the
    taxonomy window; the permutation's is theta and its twin, ``PERMUTATION_X``).
    """
    start, stop, num = window
    shown = session.wait(JS_CURVE, [previous, num], what).json_value()
    out = session.execute(
        "c = w.wait(60); r = lw.classify_curve(c); print(json.dumps([r.shape, r.reason, "
        "[m.alpha for m in r.minima], [m.loss for m in r.minima], [m.alpha for m in r.maxima], "
        "w.direction, w.mode, list(w.x_range), w.resolution]))")
    shape, reason, minima, min_loss, maxima, *controls = json.loads(out)
    assert controls[1:] == ["1d", [start, stop], num], controls
    assert shown["label"] == shape and shape in shown["text"] and shape == shown["svg"], shown
    assert shown["hover"] == reason
    np.testing.assert_allclose(shown["minima"], minima, atol=1e-12)
    np.testing.assert_allclose(shown["minLoss"], min_loss, rtol=1e-6)
    np.testing.assert_allclose(shown["maxima"], maxima, atol=1e-12)
    assert (shown["drawnMin"], shown["drawnMax"]) == (len(minima), len(maxima)), shown
    assert len(minima) >= 1
    return {**shown, "direction": controls[0], "reason": reason}


def _curve_shape(session: Session, page) -> None:
    """Step 8: curve-shape direction types in 1D, labelled, with their extrema marked."""
    select = page.locator(".lw-root .lw-controls select[title='Direction type']")
    select.select_option(label="permutation (w-basin)")
    perm = _shown_curve(session, None, "the labelled permutation curve", PERMUTATION_X)
    assert perm["direction"] == "permutation"
    page.locator(".lw-root").screenshot(path=str(ARTIFACTS / "curve_shape.png"))
    page.evaluate(JS_WATCH_STATUS)
    select.select_option(label="mined: w-peak")  # 500 Adam steps, the library's default
    mined = _shown_curve(session, perm["id"], "the labelled mined w-peak curve")
    seen = page.evaluate("() => window.lwStatusSeen")
    mining = [t for t in seen if "mined: w-peak: mining step" in t]
    assert mining, seen[-10:]
    report(f"curve shapes: the permutation direction's curve labelled {perm['label']!r} "
           f"({perm['reason']}), {len(perm['minima'])} minima and {len(perm['maxima'])} "
           f"maxima marked; mined w-peak labelled {mined['label']!r} after "
           f"{len(mining)} status updates of its mining")
