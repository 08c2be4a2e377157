"""Train a model on an MNIST-family data set:  ``python -m models.train --model NAME ...``.

``--help`` lists every option; docs/training.md explains them.  The harness lives in
:mod:`models.training`.  Several GPUs or processes: ``torchrun --nproc_per_node N -m
models.train ...`` (DDP; ``--batch-size`` is the global batch).
"""
import sys

from models.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
