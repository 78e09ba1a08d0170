"""Householder-product apply: reference math, torch/Triton backends and the autograd wrapper."""
