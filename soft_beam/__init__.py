"""soft_beam: differentiable (SOFT) top-k by entropic optimal transport, in pure torch.

Imports only torch. See :func:`soft_topk` and :func:`sorted_soft_topk`.
"""

from .ot import SolverInfo
from .topk import soft_topk, sorted_soft_topk

__all__ = ["SolverInfo", "soft_topk", "sorted_soft_topk"]
__version__ = "0.1.0"
