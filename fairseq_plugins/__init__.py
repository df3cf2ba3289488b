"""soft-beam's fairseq ``--user-dir``: registers the ``translation_soft_beam`` task and the
``soft_beam`` criterion, and makes fairseq-fixed 0.12.3.1 load checkpoints under torch >= 2.6."""

from .compat import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from . import criterion, task  # noqa: E402,F401  (registers soft_beam and translation_soft_beam)
