"""Every notebook in nbs/ runs top to bottom in a real Jupyter kernel, on a small slice of the data."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).parent.parent / 'nbs').glob('*.ipynb'))


@pytest.mark.parametrize('path', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv('LEARNKIT_NB_N_TRAIN', '2000')
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
    assert not errors
    assert any(o.get('data', {}).get('image/png') for c in nb.cells if c.cell_type == 'code'
               for o in c.get('outputs', [])), "the notebook shows no plot"
