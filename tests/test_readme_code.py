"""The README's "The method in code" block runs as written.

The block is extracted from README.md exactly as a reader would copy it and run by a
fresh Python process in an empty folder (no repository files beside it, no test-session
settings such as float64). It loads the authors' TinyImageNet ResNet32 from the shared
folder, so the test skips, naming the path, when that file is absent. Its one training
step compiles once (tens of seconds on a small CPU; the persistent compilation cache
under the repository makes reruns cheaper).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys


from conftest import require_shared

from conftest import REPO

SECTION = "## The method in code"


def readme_block() -> str:
    """The first ```python block of the README's "The method in code" section."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, f"no ```python block in the README section {SECTION!r}"
    return m.group(1)


def test_the_block_names_no_bare_files_and_hard_codes_no_channels():
    code = readme_block()
    assert "model_info(" in code and "tap_channels" in code, "channels should come from model_info(...).tap_channels"
    assert not re.search(r"channels=\(\d", code), "channels are hard-coded"
    assert "shared_path(" in code or "L2T_SHARED" in code, "the checkpoint's location is not named"


def test_the_readme_method_block_runs_as_written(tmp_path):
    require_shared("reference/tinyimagenet-resnet32.pth.tar")  # skips (fails under CI) when absent
    script = tmp_path / "readme_block.py"
    script.write_text(readme_block())
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(REPO / ".jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    env.pop("JAX_ENABLE_X64", None)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"the README block failed:\n{p.stdout}\n{p.stderr[-4000:]}"
    m = re.search(r"loss ([-+0-9.eE]+|nan|inf)", p.stdout)
    assert m, f"the block printed no loss:\n{p.stdout}"
    assert math.isfinite(float(m.group(1))), p.stdout
