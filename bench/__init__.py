"""spinalkern's benchmarks: run from the repository root as ``python -m bench.<script>``.

Not installed with the package (the wheel holds ``spinalkern`` only); see docs/benchmarks.md.
"""
