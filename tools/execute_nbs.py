"Execute notebooks in place, in chapter order, keeping their outputs (the website shows them)."
import sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient

def execute(path: Path, timeout: int = 1800):
    "Run every cell of the notebook at `path` in a fresh kernel and save the outputs back into it."
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}).execute()
    nbformat.write(nb, path)
    print(f"executed {path.name} in {time.perf_counter() - start:.0f} s", flush=True)

if __name__ == '__main__':
    nbs = [Path(p) for p in sys.argv[1:]] or sorted(Path('nbs').glob('[0-9]*.ipynb')) + [Path('nbs/index.ipynb')]
    for nb in nbs: execute(nb)
