"Render the website into _docs/: with Quarto (nbdev-docs) where it is installed, else with smalldocs."
import json, shutil, subprocess, sys, tarfile
from pathlib import Path

KATEX_VERSION = '0.16.11'  # the version smalldocs links to
KATEX_CDN = f'https://cdn.jsdelivr.net/npm/katex@{KATEX_VERSION}/dist'

def fetch_katex(cache: Path) -> Path|None:
    "Fetch KaTeX's npm package into `cache` (once) so that the site renders maths offline; None without npm."
    tgz = cache/f'katex-{KATEX_VERSION}.tgz'
    if not tgz.exists() and shutil.which('npm'):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(['npm', 'pack', '--silent', f'katex@{KATEX_VERSION}'], cwd=cache, check=False, capture_output=True)
    return tgz if tgz.exists() else None

def vendor_katex(docs: Path, tgz: Path):
    "Copy KaTeX's dist/ into the site and point every page at it instead of the CDN."
    dest = docs/'site_libs'/'katex'
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith('package/dist/'):
                target = dest/member.name.removeprefix('package/dist/')
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    for page in docs.rglob('*.html'):
        html = page.read_text()
        if KATEX_CDN in html:
            rel = Path(*(['..'] * (len(page.relative_to(docs).parts) - 1)), 'site_libs', 'katex').as_posix()
            page.write_text(html.replace(KATEX_CDN, rel))

WIDGET = 'application/vnd.jupyter.widget-view+json'
WIDGET_NOTE = '*An interactive widget: it runs when you open the notebook in Jupyter.*'

def _blank_stream(out: dict) -> bool:
    "True for a stream output with nothing but whitespace (what a cleared progress bar leaves), an empty box on a page."
    return out.get('output_type') == 'stream' and not ''.join(out.get('text', '')).strip()

def tidy_outputs(proc: Path):
    "In nbdev-proc-nbs' copies: drop blank stream outputs, and show a widget with no HTML (`VBox(children=...)`) as a note."
    for nb_path in proc.glob('*.ipynb'):
        nb = json.loads(nb_path.read_text())
        for cell in nb['cells']:
            if 'outputs' not in cell: continue
            cell['outputs'] = [o for o in cell['outputs'] if not _blank_stream(o)]
            for out in cell['outputs']:
                data = out.get('data', {})
                if WIDGET in data and not any(m in data for m in ('text/html', 'image/png', 'image/svg+xml')):
                    out['data'] = {'text/markdown': WIDGET_NOTE}
        nb_path.write_text(json.dumps(nb, indent=1))

def render(root: Path = Path('.')) -> Path:
    "Build the site from nbs/_quarto.yml into root/_docs and return the path of its index.html."
    root = root.resolve()
    bin_dir = Path(sys.executable).parent
    if shutil.which('quarto'):
        subprocess.run([str(bin_dir/'nbdev-docs')], cwd=root, check=True)
    else:
        subprocess.run([str(bin_dir/'nbdev-proc-nbs')], cwd=root, check=True)
        proc, docs = root/'_proc', root/'_docs'
        tidy_outputs(proc)
        subprocess.run([str(bin_dir/'smalldocs'), 'render', '--quiet', str(proc)], cwd=root, check=True)
        built = proc/'_docs'
        if docs.exists(): shutil.rmtree(docs)
        shutil.move(str(built), str(docs))
        if (tgz := fetch_katex(root/'.cache'/'katex')) is not None: vendor_katex(docs, tgz)
    return root/'_docs'/'index.html'

if __name__ == '__main__': print(f"website: {render()}")
