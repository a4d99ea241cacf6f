"""Array types of the public signatures: feature vectors (floats) and ids or positions (ints).

Named by kind, not size: a function takes any float or integer array, and its docstring says
the precision it returns (float32 features, int64 table ids).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.floating[Any]]
"""Feature vectors or scores, ``[d]``, ``[n, d]`` or ``[n, k]``."""

Ints = npt.NDArray[np.integer[Any]]
"""Table ids or index positions."""

Bools = npt.NDArray[np.bool_]
"""Masks (which of the ids asked for were found)."""
