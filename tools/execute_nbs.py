"Execute notebooks in place, in chapter order, keeping their outputs (the website shows them)."
import re, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient

_BAR = re.compile(r'\d+%\|.*\|\s*\d+/\d*')  # a tqdm line: " 40%|####      | 2/5 [...]"

def _is_progress_bar(output) -> bool:
    "True for a progress bar's output, which is live in JupyterLab but frozen mid-way once saved."
    if output.output_type == 'stream': return output.name == 'stderr' and bool(_BAR.search(output.text))
    text = output.get('data', {}).get('text/plain', '')
    return output.output_type == 'display_data' and bool(_BAR.search(text) or '<progress' in output.get('data', {}).get('text/html', ''))

def execute(path: Path, timeout: int = 1800):
    "Run every cell of the notebook at `path` in a fresh kernel and save the outputs back into it."
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs = [o for o in cell.outputs if not _is_progress_bar(o)]
    nbformat.write(nb, path)
    print(f"executed {path.name} in {time.perf_counter() - start:.0f} s", flush=True)

if __name__ == '__main__':
    nbs = [Path(p) for p in sys.argv[1:]] or sorted(Path('nbs').glob('[0-9]*.ipynb')) + [Path('nbs/index.ipynb')]
    for nb in nbs: execute(nb)
