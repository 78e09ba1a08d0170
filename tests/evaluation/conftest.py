"""Fixtures of the evaluation tests: a tiny random LLaMA and its tokenizer (see ``tiny.py``)."""

from __future__ import annotations

import copy

import pytest

from tests.evaluation.tiny import build_llama, build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def _tiny_base(tiny_tokenizer):
    return build_llama(len(tiny_tokenizer))


@pytest.fixture
def tiny_model(_tiny_base):
    """A fresh copy of the tiny LLaMA (4 layers, hidden 64, down_proj 64 x 128)."""
    return copy.deepcopy(_tiny_base)
