"""The training harness of the models: ``python -m models.train --model NAME ...``.

One module per job:

* ``config``      the configuration dataclass; every option described once, checked before
                  anything heavy happens
* ``cli``         the command line generated from it, exit statuses
* ``runs``        every run asked for (seeds x folds), their folders, the aggregate summary
* ``trainer``     one run: setup, the training step, the epoch loop, evaluation
* ``graphs``      the step captured in a CUDA graph (or eager)
* ``distributed`` torchrun / DDP: ranks and collectives
* ``checkpoint``  verified checkpoints, the previous one kept; what a run's checkpoint holds
* ``report``      log, progress, metrics.jsonl, summary.json, curves.png (``plots``)
* ``provenance``  the git commit of the code (also for the benchmarks)
* ``optim``       optimizers and step-function learning-rate schedules (CUDA-graph safe)
* ``augment``     per-sample augmentation on the device
* ``datasets``    the MNIST-family data sets: files, checks, downloads, the device copy
"""
