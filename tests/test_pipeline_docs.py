"""The example of docs/guide/model-parallel.md runs as written: with ``python script.py``
(``launch`` starts two processes) and with ``torchrun --nproc-per-node 2 script.py`` (``launch``
steps aside).  Each run is a subprocess with a wall-clock limit, so nothing can hang."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "guide" / "model-parallel.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert blocks, f"no python example in {PAGE}"
    return blocks[0]


@pytest.mark.parametrize("how", ["python", "torchrun"])
def test_docs_example_runs_as_written(tmp_path, how):
    script = tmp_path / "script.py"
    script.write_text(_example())
    cmd = [sys.executable, str(script)] if how == "python" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"rank 1: loss \d+\.\d{3}, logits \(64, 10\)", out), out[-2000:]
    assert "rank 0: gathered" in out, out[-2000:]
    assert (tmp_path / "stage0.pt").is_file() and (tmp_path / "stage1.pt").is_file()
