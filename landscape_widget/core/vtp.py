"""ParaView files: a surface as a VTK XML PolyData (``.vtp``) of quads, for any grid.

Points are the grid nodes ``(x[ix], y[iy], z[iy, ix])`` in row-major order (rows = y); every
grid cell ``(ix, iy)``-``(ix+1, iy+1)`` is one quad, its corners listed counter-clockwise.
Point data: the value (``name``) and, with ``log``, its log10 (the height then too); cell
data: the mean of each quad's corners. Cells with a NaN corner (not computed or non-finite)
are left out, so holes stay holes instead of being drawn at a made-up height.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .h5files import check_target


def grid_quads(nx: int, ny: int) -> np.ndarray:
    """``((nx-1)*(ny-1), 4)`` point indices of the cells of an ``ny x nx`` row-major grid.

    Returns:
        An int array with one row per grid cell (row-major over cells), holding the indices of its
        corners counter-clockwise from the lower left: ``(i, i + 1, i + 1 + nx, i + nx)``.

    Example:
        >>> grid_quads(3, 2).tolist()
        [[0, 1, 4, 3], [1, 2, 5, 4]]
    """
    iy, ix = np.meshgrid(np.arange(ny - 1), np.arange(nx - 1), indexing="ij")
    p = (iy * nx + ix).reshape(-1)
    return np.stack([p, p + 1, p + 1 + nx, p + nx], axis=1)


def _array(name: str, values: np.ndarray, components: int = 1, kind: str = "Float64") -> str:
    flat = np.asarray(values).reshape(-1)
    fmt = "%d" if kind.startswith("Int") else "%.17g"
    text = " ".join(fmt % v for v in flat) if flat.size else ""
    return (f'        <DataArray type="{kind}" Name="{name}" NumberOfComponents="{components}" '
            f'format="ascii">\n          {text}\n        </DataArray>\n')


def write_vtp(path: str | Path, x, y, z, *, name: str = "loss", log: bool = False,
              overwrite: bool = False) -> None:
    """Write the surface ``z[iy, ix]`` over ``(x, y)`` as a ``.vtp`` file ParaView opens.

    Args:
        path: The file.
        x: ``(nx,)`` coordinates.
        y: ``(ny,)`` coordinates.
        z: ``(ny, nx)`` values (NaN where there is none).
        name: Name of the value array.
        log: Use ``log10(z)`` as the height (non-positive values become holes); the point
            data then holds both ``name`` and ``log10 name``.
        overwrite: Replace an existing file.

    Raises:
        ValueError: If the shapes do not match or the grid has fewer than 2 x 2 points.
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if z.shape != (y.size, x.size):
        raise ValueError(f"z has shape {z.shape}; for {x.size} x and {y.size} y coordinates it "
                         f"must be ({y.size}, {x.size}), rows = y.")
    if x.size < 2 or y.size < 2:
        raise ValueError("a .vtp surface needs at least 2 x 2 grid points.")
    path = check_target(path, overwrite)
    height = z
    point_data = _array(name, z)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            height = np.log10(np.where(z > 0, z, np.nan))
        point_data += _array(f"log10 {name}", height)
    xx, yy = np.meshgrid(x, y)
    points = np.stack([xx.ravel(), yy.ravel(), height.ravel()], axis=1)
    quads = grid_quads(x.size, y.size)
    hz = height.ravel()[quads]
    keep = np.isfinite(hz).all(axis=1)
    quads = quads[keep]
    # A NaN height would break ParaView's bounds: points without a value sit at z = 0 and
    # belong to no cell (and their point value stays NaN).
    points[~np.isfinite(points[:, 2]), 2] = 0.0
    cell_mean = z.ravel()[quads].mean(axis=1) if quads.size else np.zeros(0)
    text = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" '
        'header_type="UInt64">\n  <PolyData>\n'
        f'    <Piece NumberOfPoints="{len(points)}" NumberOfVerts="0" NumberOfLines="0" '
        f'NumberOfStrips="0" NumberOfPolys="{len(quads)}">\n'
        f'      <PointData Scalars="{name}">\n{point_data}      </PointData>\n'
        f'      <CellData Scalars="mean {name}">\n{_array(f"mean {name}", cell_mean)}'
        '      </CellData>\n'
        f'      <Points>\n{_array("Points", points, 3)}      </Points>\n'
        '      <Polys>\n'
        f'{_array("connectivity", quads, 1, "Int64")}'
        f'{_array("offsets", 4 * np.arange(1, len(quads) + 1), 1, "Int64")}'
        '      </Polys>\n    </Piece>\n  </PolyData>\n</VTKFile>\n'
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
