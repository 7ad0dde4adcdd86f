"""The demo notebook runs top to bottom (its QUICK mode: a few steps of a smaller model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "metastone_jax_demo.ipynb"


def notebook_as_script() -> str:
    """The code cells in order, without the notebook-only lines (shell `!` and magics `%`)."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    lines = [line for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("!", "%")))


def test_demo_notebook_runs_and_reports_each_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the notebook picks its own fake devices
    ran = subprocess.run(
        [sys.executable, "-c", notebook_as_script()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "QUICK": "1", "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(NOTEBOOK.parents[1])},
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "sprm@k" in ran.stdout and "step scores:" in ran.stdout
    wire = dict(
        line.split(":")[0].split()[-1:] + [float(line.split(":")[1].split()[0])]
        for line in ran.stdout.splitlines()
        if "kB on the wire" in line
    )
    assert wire["onebit"] * 25 <= wire["pmean"] and wire["bytegrad"] * 3 <= wire["pmean"]
    assert (tmp_path / "runs" / "notebook" / "model" / "score_module.pt").exists()
    assert (tmp_path / "runs" / "notebook" / "eval" / "scaling.png").exists()
