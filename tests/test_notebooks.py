"One test per notebook: execute it with nbdev's test runner, in its own process (cells flagged `notest` or `cuda` are skipped)."
import os, subprocess, sys
from pathlib import Path
import pytest

NBS = Path(__file__).resolve().parent.parent/'nbs'

@pytest.mark.parametrize('notebook', sorted(p.name for p in NBS.glob('*.ipynb')))
def test_notebook_runs(notebook):
    cmd = [str(Path(sys.executable).parent/'nbdev-test'), str(NBS/notebook), '--do-print', '--n-workers', '0']
    if os.environ.get('QUANTCOURSE_TEST_CUDA'): cmd += ['--flags', 'cuda']
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=NBS.parent)
    assert run.returncode == 0, f"{notebook} failed:\n{run.stdout[-5000:]}\n{run.stderr[-10000:]}"
