"""The committed protobuf modules are exactly what proto/generate.py makes."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
