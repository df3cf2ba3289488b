"""soft-beam's fairseq ``--user-dir``: registers the ``translation_soft_beam`` task and the
``soft_beam`` criterion, fixes faults of fairseq-fixed 0.12.3.1 under current torch, makes its
checkpoint writes survive a kill, and checks settings and checkpoints at the door (see ``compat``)."""

from . import compat

# At import: fairseq imports a --user-dir while parsing arguments, before it loads a checkpoint or
# batches data, and it looks the patched functions up at call time.
compat.apply()

from . import criterion, task  # noqa: E402,F401  (registers soft_beam and translation_soft_beam)
