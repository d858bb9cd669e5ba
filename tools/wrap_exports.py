"""Re-wrap the two kinds of module line nbdev writes wider than the course's 100 columns.

nbdev-export puts a module's docstring (the notebook's description) on one line and wraps `__all__` at 120
columns, with no setting for either. This rewraps both at 100, touching nothing else, and changes a file only
when its text changes (running it twice is the same as once). The Makefile runs it after every nbdev-export.
"""
import ast, re, sys, textwrap
from pathlib import Path

WIDTH = 100
ROOT = Path(__file__).resolve().parent.parent / 'quantcourse'


def wrap_module(text: str) -> str:
    "`text` with its first-line docstring and its `__all__` list wrapped at WIDTH."
    first, _, rest = text.partition('\n')
    if first.startswith('"""') and len(first) > WIDTH:
        first = '\n'.join(textwrap.wrap(first, WIDTH, break_long_words=False, break_on_hyphens=False))
    match = re.search(r'^__all__ = (\[.*?\])$', rest, flags=re.S | re.M)
    if match:
        names = ast.literal_eval(match.group(1))
        lines = textwrap.wrap(str(names), WIDTH - len('__all__ = '), break_long_words=False,
                              break_on_hyphens=False)
        rest = rest[:match.start()] + '__all__ = ' + f"\n{' ' * 10}".join(lines) + rest[match.end():]
    return first + '\n' + rest


if __name__ == '__main__':
    for path in sorted(ROOT.glob('*.py')):
        if path.name == '_modidx.py': continue
        old = path.read_text()
        new = wrap_module(old)
        if new != old: path.write_text(new)
