"""Fixtures of the fast-path tests: the tiny tokenizer, and tiny GPT-2 (learned positions) and
Llama (rotary) models saved once per module. Test files that need another tokenizer define
their own ``tokenizer`` fixture, which takes precedence."""

import pytest

from tests.tiny_models import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def folder(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
