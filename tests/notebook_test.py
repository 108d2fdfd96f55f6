"""Executes notebooks/gunn_quickstart.ipynb top to bottom (smoke settings)."""

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / 'notebooks' / 'gunn_quickstart.ipynb'


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv('GUNN_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('GUNN_NOTEBOOK_WORKDIR', str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError, naming the cell, if any cell fails.
  nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name='python3',
    resources={'metadata': {'path': str(ROOT / 'notebooks')}},
  ).execute()

  outputs = [
    out
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for out in cell.outputs
  ]
  images = [out for out in outputs if 'image/png' in out.get('data', {})]
  assert len(images) == 3  # The update order, the curves, the digits.
  text = ''.join(out.get('text', '') for out in outputs)
  assert 'total' in text and '1,585,746' in text
  for name in ('gunn_mini', 'sunn_mini'):
    assert f'{name}: final test error' in text
    assert (tmp_path / name / 'metrics.jsonl').exists()
  assert os.path.exists(tmp_path / 'gunn_mini' / 'checkpoints')
