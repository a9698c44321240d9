"""Paper-level recipes built on the core engine (see ../../shared/DESIGN.md).

- :mod:`.optimizers`, :mod:`.runs`, :mod:`.runs_figure`, :mod:`.triangle`: optimizer
  comparisons from one start, switching and planes through three models (Im et al. 2016).
- :mod:`.masks`, :mod:`.plane`, :mod:`.mpo`, :mod:`.pattern_fit`: multi-point optimisation
  (Skorokhodov & Burtsev 2019).
- :mod:`.curves`, :mod:`.permute`, :mod:`.side`, :mod:`.mining`: the curve taxonomy and
  mined directions (Li, Li & Zhan 2024).
- :mod:`.skip`: ResNets with and without shortcuts, trained and mapped (Li et al. 2018).
"""

from .curves import (
    SHAPE_X,
    SHAPES,
    CurveShape,
    Extremum,
    ShapedDirection,
    ShapedPlane,
    ShapeWarning,
    classify_curve,
)
from .masks import (
    checkerboard,
    image_mask,
    random_mask,
    random_squares,
    ternary_mask,
    text_mask,
)
from .mining import mine_direction, rayleigh_quotient
from .mining_plane import mine_plane
from .mpo import fit_pattern, fresh_networks
from .pattern_fit import PatternFit
from .permute import permutation_direction
from .plane import FlatLayout, PatternPlane
from .side import side_direction

__all__ = [
    "ternary_mask", "checkerboard", "random_mask", "random_squares", "text_mask", "image_mask",
    "fit_pattern", "fresh_networks", "PatternFit", "PatternPlane", "FlatLayout",
    "classify_curve", "CurveShape", "ShapeWarning", "ShapedDirection", "ShapedPlane",
    "Extremum", "SHAPES", "SHAPE_X", "mine_direction",
    "mine_plane", "permutation_direction", "side_direction", "rayleigh_quotient",
]
