"""One test per notebook: execute it with nbdev's test runner, in its own process (cells flagged `notest` or
`cuda` are skipped).

The selected notebooks start together on a pool of `QUANTCOURSE_TEST_WORKERS` processes (default 2), the
longest first, each process with its share of the CPU's threads; each test waits for its own notebook. On a
2-core machine two single-threaded notebooks keep both cores busy through the parts that one process runs
on one core anyway (imports, model loading, Python loops), so the whole set finishes sooner than one by one.
"""
import os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest

NBS = Path(__file__).resolve().parent.parent/'nbs'
NOTEBOOKS = sorted(p.name for p in NBS.glob('*.ipynb'))
# roughly the longest first (seconds on a 2-core CPU): two workers then finish close together
LONGEST_FIRST = ['03_outliers', '08_qlora', '05_awq', '06_gguf', '20_api', '11_below4', '04_gptq',
                 '02_scales', '07_nf4', '00_core']

def _longest_first(name: str) -> int:
    stem = Path(name).stem
    return LONGEST_FIRST.index(stem) if stem in LONGEST_FIRST else len(LONGEST_FIRST)

def run_notebook(name: str, threads: int) -> subprocess.CompletedProcess:
    "Execute notebook `name` with nbdev-test in a new process using `threads` CPU threads."
    cmd = [str(Path(sys.executable).parent/'nbdev-test'), str(NBS/name), '--do-print', '--n-workers', '0']
    if os.environ.get('QUANTCOURSE_TEST_CUDA'): cmd += ['--flags', 'cuda']
    env = os.environ | {'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=NBS.parent, env=env)

@pytest.fixture(scope='session')
def notebook_runs(request):
    "{notebook: future of its run}, every notebook this session selected started on a pool."
    selected = [item.callspec.params['notebook'] for item in request.session.items
                if getattr(item, 'originalname', None) == 'test_notebook_runs']
    workers = max(1, int(os.environ.get('QUANTCOURSE_TEST_WORKERS', '2')))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ThreadPoolExecutor(workers)
    futures = {name: pool.submit(run_notebook, name, threads)
               for name in sorted(selected, key=_longest_first)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)

@pytest.mark.parametrize('notebook', NOTEBOOKS)
def test_notebook_runs(notebook, notebook_runs):
    run = notebook_runs[notebook].result()
    assert run.returncode == 0, f"{notebook} failed:\n{run.stdout[-5000:]}\n{run.stderr[-10000:]}"
