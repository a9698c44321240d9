"""Paper-level recipes built on the core engine (see ../../shared/DESIGN.md).

- :mod:`.optimizers`, :mod:`.runs`, :mod:`.runs_figure`, :mod:`.triangle`: optimizer
  comparisons from one start, switching and planes through three models (Im et al. 2016).
- :mod:`.masks`, :mod:`.plane`, :mod:`.mpo`, :mod:`.pattern_fit`: multi-point optimisation
  (Skorokhodov & Burtsev 2019).
"""

from .masks import (
    checkerboard,
    image_mask,
    random_mask,
    random_squares,
    ternary_mask,
    text_mask,
)
from .mpo import fit_pattern, fresh_networks
from .pattern_fit import PatternFit
from .plane import FlatLayout, PatternPlane

__all__ = [
    "ternary_mask", "checkerboard", "random_mask", "random_squares", "text_mask", "image_mask",
    "fit_pattern", "fresh_networks", "PatternFit", "PatternPlane", "FlatLayout",
]
