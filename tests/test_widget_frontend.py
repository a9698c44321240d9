"""What the kernel gives the front end so every host shows the truth (issue 16).

A view learns a kernel is behind it from the ``ready`` answer to its ``sync`` (a view
restored from saved widget state hears nothing and disables its compute controls); the
status trait of a finished job carries the ``done`` message's summary (a re-render shows
it); ``fit_settings`` holds the settings a fit really ran with (a resumed fit keeps those
it was created with), and the HTML export carries them; no plotly config of the bundle
offers to send data to a server. The browser side is tested in tests/test_browser.py.
"""

from __future__ import annotations

import json
import re

from widget_cases import FakeFrontEnd

import landscape_widget as lw
from landscape_widget.widget.export import STATIC


def test_sync_is_answered_ready_even_with_nothing_running(widget):
    front = FakeFrontEnd(widget)
    widget.handle_message({"kind": "sync", "id": "view-1"})
    assert front.sent == [({"kind": "ready", "id": "view-1"}, [])]


def test_status_of_a_finished_job_carries_the_done_summary(widget):
    front = FakeFrontEnd(widget)
    widget.compute()
    widget.wait(60)
    done = [m for m, _ in front.sent if m["kind"] == "done"][-1]
    status = widget.status
    assert status["state"] == "done" and status["id"] == done["id"]
    for key in ("evaluated", "reused", "seconds", "nonfinite"):
        assert status[key] == done[key], key
    assert done["evaluated"] + done["reused"] == 25
    widget.resolution = 7  # the next job reuses the 5x5 points it shares
    widget.wait(60)
    done2 = [m for m, _ in front.sent if m["kind"] == "done"][-1]
    assert done2["id"] != done["id"] and widget.status["reused"] == done2["reused"] > 0


def test_fit_settings_are_those_the_fit_ran_with(widget):
    widget.fit_pattern(lw.checkerboard(4), steps=3, lr=0.01, tau=2.0, cells_per_step=7,
                       batch_size=16, seed=3)
    widget.wait_fit(60)
    assert widget.fit_settings == {"lr": 0.01, "tau": 2.0, "cells_per_step": 7, "seed": 3,
                                   "batch_size": 16, "steps": 3}
    # A resumed fit keeps training with its own settings, whatever the boxes said.
    widget.fit_pattern(lw.checkerboard(4), steps=2, lr=0.5, tau=9.0, cells_per_step=1,
                       batch_size=16, seed=8, resume=True)
    fit = widget.wait_fit(60)
    assert fit.step == 5 and fit.config["lr"] == 0.01
    assert widget.fit_settings == {"lr": 0.01, "tau": 2.0, "cells_per_step": 7, "seed": 3,
                                   "batch_size": 16, "steps": 2}
    page = widget.to_html()
    state = json.loads(re.search(r'id="lw-state">(.*?)</script>', page, re.S).group(1))
    assert state["fit_settings"] == widget.fit_settings and state["_static"] is True


def test_bundle_turns_plotly_cloud_sharing_off():
    bundle = (STATIC / "widget.js").read_text()
    # PLOT_CONFIG of js/src/theme.js, minified: every plot of the widget uses it.
    config = re.search(r"\{displaylogo:!1,showSendToCloud:!1,plotlyServerURL:\"\","
                       r"modeBarButtonsToRemove:\[\"sendChartToCloud\"\]\}", bundle)
    assert config is not None
