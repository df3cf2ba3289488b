"""soft-beam's fairseq ``--user-dir``: registers the ``translation_soft_beam`` task and the
``soft_beam`` criterion, and fixes three faults of fairseq-fixed 0.12.3.1 under current torch (see ``compat``)."""

from .compat import allow_fairseq_checkpoints, keep_last_partial_batch, report_nans_without_backward_hooks

allow_fairseq_checkpoints()
keep_last_partial_batch()
report_nans_without_backward_hooks()

from . import criterion, task  # noqa: E402,F401  (registers soft_beam and translation_soft_beam)
