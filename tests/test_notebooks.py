"""Every notebook under notebooks/ executes top to bottom without error."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
  nb = nbformat.read(path, as_version=4)
  # The kernel is a fresh process: one CPU device, no accelerator needed.
  env_backup = dict(os.environ)
  os.environ["XLA_FLAGS"] = ""
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_backup)
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not any(o.output_type == "error" for o in outputs)
  text = "".join(o.get("text", "") for o in outputs)
  assert "max |policy - anchor| = 0.0" in text
