"""landscape_widget: explore the loss landscapes of PyTorch models, live in Jupyter.

Example::

    import landscape_widget as lw
    model, data = lw.demo.trained_mlp()
    lw.compute_surface(model, data).to_plotly()
"""

from . import datasets, demo, models
from .core.curvature import CurvatureMap, curvature_map
from .core.directions import (
    interpolation_direction,
    normalize_direction,
    random_direction,
    random_directions,
)
from .core.dirfile import load_directions, save_directions
from .core.distributed import local_gpu_executor
from .core.errors import (
    AccuracyUndefined,
    Cancelled,
    InputChanged,
    IsolationError,
    NoCountedTargets,
    ReuseMismatch,
)
from .core.evaluate import Evaluator
from .core.grid import MAX_AXIS_POINTS, MAX_GRID_POINTS
from .core.hessian import TraceEstimate, hessian_density, hessian_eigenpairs, hessian_trace
from .core.landscape import TileStream, compute_curve, compute_surface, iter_tiles
from .core.metrics import multilabel_accuracy
from .core.stats import (
    LandscapeStats,
    basin_radius,
    count_minima,
    landscape_stats,
    nonconvex_fraction,
    roughness,
)
from .core.surface import Curve, Surface
from .core.trajectory import PCADirections, Trajectory
from .experiments import (
    PatternFit,
    checkerboard,
    fit_pattern,
    image_mask,
    random_mask,
    random_squares,
    ternary_mask,
    text_mask,
)
from .experiments.curves import (
    SHAPE_X,
    SHAPES,
    CurveShape,
    ShapedDirection,
    ShapedPlane,
    ShapeWarning,
    classify_curve,
)
from .experiments.mining import mine_direction, rayleigh_quotient
from .experiments.mining_plane import mine_plane
from .experiments.permute import permutation_direction
from .experiments.runs import OptimizerRuns, compare_optimizers
from .experiments.side import side_direction
from .experiments.triangle import TriangleSurface, triangle_surface
from .magic import load_ipython_extension
from .widget import LandscapeWidget

__version__ = "0.1.0"

__all__ = [
    # typed errors (catch by class)
    "AccuracyUndefined",
    "Cancelled",
    "InputChanged",
    "IsolationError",
    "NoCountedTargets",
    "ReuseMismatch",
    # directions
    "random_direction",
    "random_directions",
    "interpolation_direction",
    "normalize_direction",
    # loss-landscape's directions files
    "save_directions",
    "load_directions",
    # computation
    "compute_surface",
    "compute_curve",
    "iter_tiles",
    "TileStream",
    "multilabel_accuracy",
    "Evaluator",
    "local_gpu_executor",
    "MAX_AXIS_POINTS",
    "MAX_GRID_POINTS",
    # results
    "Surface",
    "Curve",
    # training paths and curvature (Li et al. 2018)
    "Trajectory",
    "PCADirections",
    "hessian_eigenpairs",
    "hessian_trace",
    "hessian_density",
    "TraceEstimate",
    "curvature_map",
    "CurvatureMap",
    # convex vs chaotic: landscape statistics
    "landscape_stats",
    "LandscapeStats",
    "nonconvex_fraction",
    "count_minima",
    "roughness",
    "basin_radius",
    # loss patterns: multi-point optimisation (Skorokhodov & Burtsev 2019)
    "ternary_mask",
    "fit_pattern",
    "PatternFit",
    "checkerboard",
    "random_mask",
    "random_squares",
    "text_mask",
    "image_mask",
    # optimizer comparisons (Im, Tao & Branson 2016)
    "compare_optimizers",
    "OptimizerRuns",
    "triangle_surface",
    "TriangleSurface",
    # curve shapes and mined directions (Li, Li & Zhan 2024)
    "classify_curve",
    "ShapeWarning",
    "ShapedDirection",
    "ShapedPlane",
    "CurveShape",
    "SHAPES",
    "SHAPE_X",
    "mine_direction",
    "mine_plane",
    "permutation_direction",
    "side_direction",
    "rayleigh_quotient",
    # the live widget and the %landscape notebook extension
    "LandscapeWidget",
    "load_ipython_extension",
    # offline data and models
    "datasets",
    "demo",
    "models",
]
