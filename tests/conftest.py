"""Shared fixtures: the tiny random Llama, built once per session."""

import pytest

from kpig_trainer import testing


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """``tiny_llama(seed=0)``: a tiny random ``LlamaForCausalLM`` and its ChatML tokenizer.

    Shared by the whole session: a test that trains or otherwise changes the model must work on
    ``copy.deepcopy(model)``, and must not change the tokenizer (e.g. ``padding_side``) in place.
    """
    return testing.tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's tokenizer (its own instance; do not change it in place, build
    ``kpig_trainer.testing.tiny_tokenizer()`` for a private one)."""
    return testing.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A folder holding ``tiny_llama(seed=0)`` saved with ``save_pretrained`` (for subprocesses)."""
    return testing.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)
