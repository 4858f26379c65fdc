"""`spade-exit` resolves in fresh interpreters, and lm-eval's own models still do."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = (
    "from lm_eval.api.registry import get_model; "
    "print(get_model('spade-exit').__name__, get_model('hf').__name__, "
    "get_model('dummy').__name__)"
)


@pytest.mark.parametrize(
    "code",
    [
        CHECK,  # the installed startup hook alone, as in the `lm_eval` command
        "import lm_eval_spade; " + CHECK,  # explicit import first
        "import lm_eval.api.registry; import lm_eval_spade; " + CHECK,  # registry first
        "import lm_eval_spade.model; " + CHECK,  # the model module first
    ],
)
def test_registration_in_fresh_interpreter(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["SpadeExitLM", "HFLM", "DummyLM"]
