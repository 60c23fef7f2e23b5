"""Bad command-line input gets one `error:` line and exit status 2, never a traceback.

Each case here gave a traceback (exit 1) before: a config file that does not exist,
one with a syntax error, one whose get_config raises.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=str(REPO), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("content,needle", [
    (None, "config file not found"),
    ("def get_config(:\n", "SyntaxError"),
    ("def get_config():\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
])
@pytest.mark.parametrize("tool", [("-m", "experiments.run"), ("-m", "l2t_jax.reference", "precision")])
def test_bad_config_file_is_one_line_exit_2(tmp_path, content, needle, tool):
    path = tmp_path / "cfg.py"
    if content is not None:
        path.write_text(content)
    proc = _run(*tool, f"--config={path}", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: ") and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()
