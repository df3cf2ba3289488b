"""Runs fairseq-train in this process, then saves this rank's parameters to argv[1].

fairseq saves checkpoints only on rank 0, so the distributed test needs each rank's own copy.
"""

import sys

import torch
from fairseq import trainer as fairseq_trainer
from fairseq_cli.train import cli_main

trainers = []
_init = fairseq_trainer.Trainer.__init__


def _capture(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    trainers.append(self)


fairseq_trainer.Trainer.__init__ = _capture
out = sys.argv.pop(1)
cli_main()
torch.save({k: v.detach().clone() for k, v in trainers[0].model.state_dict().items()}, out)
