"""Re-execute the tutorials in place and keep only the outputs that nbval checks.

Run with ``make notebooks`` after editing a notebook. Cells marked ``# NBVAL_CHECK_OUTPUT``
keep their (deterministic, small) outputs, which nbval compares in CI; every other cell is
cleared, so no plotly JSON or progress widget lands in git and each file stays small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KEEP = ("NBVAL_CHECK_OUTPUT",)
LIMIT_BYTES = 200_000


def refresh(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={
        "metadata": {"path": str(path.parent)}}).execute()
    count = 0
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        if not any(marker in cell.source for marker in KEEP):
            cell.outputs = []
        for out in cell.outputs:
            if "execution_count" in out:
                out["execution_count"] = count
    nb.metadata.pop("widgets", None)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    size = path.stat().st_size
    print(f"{path}: {size} bytes")
    if size > LIMIT_BYTES:
        raise SystemExit(f"{path} is {size} bytes; keep committed notebooks small.")


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.glob("[0-9]*.ipynb"))
    for p in paths:
        refresh(p)
