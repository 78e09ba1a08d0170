"""Kernel implementations, one folder per op."""
