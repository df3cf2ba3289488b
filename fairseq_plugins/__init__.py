"""soft-beam's fairseq ``--user-dir``: registers the ``translation_soft_beam`` task and the
``soft_beam`` criterion, and fixes two faults of fairseq-fixed 0.12.3.1 (see ``compat``)."""

from .compat import allow_fairseq_checkpoints, keep_last_partial_batch

allow_fairseq_checkpoints()
keep_last_partial_batch()

from . import criterion, task  # noqa: E402,F401  (registers soft_beam and translation_soft_beam)
