"""Benchmark suite of mose_kernels: every Householder-apply kernel against the honest alternatives
and the physical floor, plus end-to-end editing throughput. Entry point: ``python -m bench``."""
