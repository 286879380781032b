"""Shared fixtures: where the real ChatGLM3 tokenizer is, and small checkpoint directories on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .paths import REPO_ROOT

# Triton kernels run in the interpreter on machines without CUDA; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_ENV = "GLMSERVE_CHATGLM3_TOKENIZER"


def find_chatglm3_dir() -> Path | None:
    """The folder holding the real ChatGLM3 tokenizer.model (and golden.json when it is ../shared/chatglm3).

    Looks at $GLMSERVE_CHATGLM3_TOKENIZER first (a path to tokenizer.model), then ../shared/chatglm3 beside the
    checkout. A fresh clone has neither, and the tests that need it skip with this reason.
    """
    env = os.environ.get(TOKENIZER_ENV)
    if env and Path(env).is_file():
        return Path(env).parent
    shared = REPO_ROOT.parent / "shared" / "chatglm3"
    if (shared / "tokenizer.model").is_file():
        return shared
    return None


SKIP_REASON = (f"the real ChatGLM3 tokenizer.model was not found: set {TOKENIZER_ENV}=/path/to/tokenizer.model "
               "or place it at ../shared/chatglm3/tokenizer.model")


@pytest.fixture(scope="session")
def chatglm3_tokenizer_path() -> Path:
    folder = find_chatglm3_dir()
    if folder is None:
        pytest.skip(SKIP_REASON)
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def real_tokenizer(chatglm3_tokenizer_path):
    """The official ChatGLM3 tokenizer (skips without it)."""
    from glmserve.engine.text.tokenizer import ChatGLMTokenizer
    return ChatGLMTokenizer.from_file(chatglm3_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The embedded tokenizer of the glm-tiny demo model."""
    from glmserve.engine.text.tokenizer import ChatGLMTokenizer, embedded_tokenizer_path
    return ChatGLMTokenizer.from_file(embedded_tokenizer_path())


@pytest.fixture(scope="session")
def chatglm3_golden() -> dict:
    folder = find_chatglm3_dir()
    if folder is None or not (folder / "golden.json").is_file():
        pytest.skip("golden.json (official ChatGLM3 token ids) not found beside the tokenizer: " + SKIP_REASON)
    return json.loads((folder / "golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A glm-tiny checkpoint directory in the real ChatGLM3 format (fp32 safetensors, embedded tokenizer)."""
    import torch

    from glmserve.engine.model.checkpoint_writer import write_checkpoint
    from glmserve.engine.config.model_config import MODEL_PRESETS
    from glmserve.engine.text.tokenizer import embedded_tokenizer_path
    return write_checkpoint(tmp_path_factory.mktemp("glm-tiny"), MODEL_PRESETS["glm-tiny"],
                            embedded_tokenizer_path(), dtype=torch.float32, seed=0)
