"""soft_beam: differentiable (SOFT) top-k by entropic optimal transport, in pure torch.

Imports only torch. See :func:`soft_topk` and :func:`sorted_soft_topk`; :func:`build_problem`
gives the transport problem they solve, and :mod:`soft_beam.ot` the solver. The beam search over
any ``StepModel`` is :mod:`soft_beam.search`, and the losses on its result :mod:`soft_beam.losses`
(whose sentence BLEU imports sacreBLEU on first use).
"""

from .ot import ConvergenceError, SolverInfo
from .topk import TopKProblem, build_problem, soft_topk, sorted_soft_topk

__all__ = ["ConvergenceError", "SolverInfo", "TopKProblem", "build_problem", "soft_topk", "sorted_soft_topk"]
__version__ = "0.1.0"
