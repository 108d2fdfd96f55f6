"""Executes notebooks/gunn_quickstart.ipynb top to bottom (smoke settings)."""

import os
import pathlib

import helpers
import jax
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
    timeout=helpers.TIMEOUT_S,
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
  # The update order, the curves, the diagnostics figure, PR / N during
  # training, the digits.
  assert len(images) == 5
  text = ''.join(out.get('text', '') for out in outputs)
  assert f'JAX {jax.__version__} on cpu: [CpuDevice(id=0)' in text
  assert 'total' in text and '1,585,746' in text
  for name in ('gunn_mini', 'sunn_mini', 'gunn_mini_nores'):
    assert f'{name}: final test error' in text
    assert (tmp_path / name / 'metrics.jsonl').exists()
    assert f'{"stage3_gunn":18} {name}' in text  # The diagnostics table.
  assert (tmp_path / 'singularities.png').exists()
  assert os.path.exists(tmp_path / 'gunn_mini' / 'checkpoints')
