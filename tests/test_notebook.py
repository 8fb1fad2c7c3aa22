"""notebooks/quickstart.ipynb runs top to bottom (a few training steps) and shows its results."""

import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", "quickstart.ipynb")


def _outputs(cell, output_type):
  return [o for o in cell.get("outputs", []) if o["output_type"] == output_type]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("DIM_QUICKSTART_STEPS", "smoke")
  monkeypatch.setenv("DIM_QUICKSTART_WORKDIR", str(tmp_path / "work"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel is this interpreter, so the notebook sees the package under test (no install).
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute(env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not _outputs(c, "error") for c in code)
  # The tokenizers and both DIM phases trained and reported.
  text = "".join(o.get("text", "") for c in code for o in _outputs(c, "stream"))
  assert "listener: step 6" in text and "speaker: step 6" in text
  assert "finetune_listener: step 4" in text
  # One clip's trajectory figure, the metric table with every method, then every plot.
  images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
  work = tmp_path / "work"
  plots = sorted(p.name for p in (work / "evaluate" / "plots").iterdir())
  assert len(images) == 1 + len(plots) and (work / "one_clip.png").exists()
  tables = [o["data"]["text/markdown"] for c in code for o in c.outputs
            if "text/markdown" in o.get("data", {})]
  assert len(tables) == 1
  for method in ("DIM-Listener", "Random", "Mirror", "NN-motion", "NN-audio"):
    assert method in tables[0]
  assert (work / "evaluate" / "report.md").exists()
