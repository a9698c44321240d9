"""``python -m landscape_widget``: compute the demo surface headless and write it as HTML.

This is what ``make demo`` runs. The HTML file embeds plotly.js, so it opens offline::

    python -m landscape_widget --out demo.html --num 41 --kind contour
"""

from __future__ import annotations

import argparse
import sys
import time

from . import compute_surface, demo


def _write_png(surface, path: str) -> str:
    """Write a contour PNG with plotly (kaleido) if it works, else with matplotlib."""
    try:
        surface.to_plotly("contour", title="Loss surface of the demo MLP").write_image(
            path, width=640, height=560, scale=2
        )
        return "plotly"
    except Exception:  # noqa: BLE001 - kaleido missing or without a browser: fall back
        pass
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit(
            "--png needs plotly's kaleido (with a Chrome) or matplotlib: pip install matplotlib"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=150)
    cs = ax.contourf(surface.x, surface.y, surface.loss, levels=32, cmap="viridis")
    ax.contour(surface.x, surface.y, surface.loss, levels=cs.levels[::4], colors="white",
               linewidths=0.5, alpha=0.6)
    ax.plot([0], [0], "rx", markersize=9, label="θ (the trained model)")
    fig.colorbar(cs, ax=ax, label="training loss")
    ax.set(xlabel="α (filter-normalised direction 1)", ylabel="β (filter-normalised direction 2)",
           title="Loss surface of the demo MLP (digits)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def main(argv: list[str] | None = None) -> int:
    """Train the demo model, compute its surface and write ``--out`` (and ``--png``)."""
    parser = argparse.ArgumentParser(prog="python -m landscape_widget", description=__doc__)
    parser.add_argument("--out", default="demo.html", help="HTML file to write (demo.html)")
    parser.add_argument("--num", type=int, default=41, help="grid points per axis (41)")
    parser.add_argument("--span", type=float, default=1.0, help="range [-span, span] (1.0)")
    parser.add_argument("--kind", default="contour", choices=["contour", "heatmap", "surface"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the directions (0)")
    parser.add_argument("--png", default=None, help="also write a contour PNG here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model, data = demo.default_model()
    print(f"trained the demo model in {time.perf_counter() - t0:.1f} s")
    grid = (-args.span, args.span, args.num)
    surface = compute_surface(model, data, x=grid, y=grid, seed=args.seed)
    fig = surface.to_plotly(args.kind, title="Loss surface of the demo MLP (digits)")
    fig.write_html(args.out, include_plotlyjs=True, full_html=True)
    print(f"wrote {args.out} ({args.num}x{args.num} points, {time.perf_counter() - t0:.1f} s)")
    if args.png:
        how = _write_png(surface, args.png)
        print(f"wrote {args.png} (rendered with {how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
