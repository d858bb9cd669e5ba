"Write README.md from nbs/index.ipynb without Quarto: markdown cells, shown code, and text outputs."
import re
from pathlib import Path
import nbformat

def _directives(source: str) -> dict:
    "The `#| key: value` directives at the top of a cell."
    return dict((m.group(1), m.group(2).strip()) for m in re.finditer(r'^#\|\s*([\w-]+):?(.*)$', source, re.M))

def _output_text(output) -> str|None:
    "Markdown for one cell output: markdown as is, plain text and streams fenced, images and HTML left out."
    if output.output_type == 'stream': return f"```\n{output.text.rstrip()}\n```"
    data = output.get('data', {})
    if 'text/markdown' in data: return data['text/markdown'].strip()
    if 'text/plain' in data and not ({'text/html', 'image/png'} & data.keys()): return f"```\n{data['text/plain'].rstrip()}\n```"
    return None

def readme(nb_path: Path = Path('nbs/index.ipynb')) -> str:
    "The README text for the index notebook at `nb_path`."
    parts = []
    for cell in nbformat.read(nb_path, as_version=4).cells:
        if cell.cell_type == 'markdown':
            parts.append(re.sub(r'\]\((\d\d_\w+|index)\.ipynb\)', r'](nbs/\1.ipynb)', cell.source.strip())); continue
        d = _directives(cell.source)
        if 'hide' in d or 'default_exp' in d: continue
        code = '\n'.join(l for l in cell.source.splitlines() if not l.startswith('#|')).strip()
        if code and d.get('echo') != 'false': parts.append(f"```python\n{code}\n```")
        parts += [t for t in map(_output_text, cell.get('outputs', [])) if t]
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text = '<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n' + readme()
    Path('README.md').write_text(text)
