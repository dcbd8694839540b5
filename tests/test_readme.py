"""The README's "From Python" example runs as written, from the repository root."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # end to end: loads both shipped models, replays a 12 s video


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the From Python section should hold exactly one python block"
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"'[^']+': top regions \[\d+(, \d+)*\]", out), out
    assert re.search(r"answer '.*', reliance path: (Fixation|Wandering|stable)", out), out
    assert re.search(r"answer '.*', time to first token \d+\.\d\d s", out), out
