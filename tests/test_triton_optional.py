"""triton is not a dependency of the server: CPU installs (and the CPU image) go without it, and CUDA builds of torch
bring their own. Asking for the triton backend without it is a clear configuration error, not a traceback."""
from __future__ import annotations

import sys

import pytest
import torch

from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.entrypoints.cli.main import main as cli_main


@pytest.fixture
def without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)     # `import triton` raises ImportError
    for name in [n for n in sys.modules if n.startswith("glmserve.kernels.triton")]:
        monkeypatch.delitem(sys.modules, name)


def test_triton_backend_without_triton_is_a_config_error(without_triton):
    with pytest.raises(ConfigError, match="needs the triton package"):
        make_attention_backend("triton", torch.device("cpu"))
    assert make_attention_backend("auto", torch.device("cpu")).name in ("cpu", "torch")


def test_cli_without_triton_says_so_in_one_line(without_triton, capsys):
    assert cli_main(["generate", "--model", "glm-tiny", "--attention-backend", "triton", "--prompt", "hi",
                     "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the triton package" in err and "Traceback" not in err and len(err.splitlines()) == 1
