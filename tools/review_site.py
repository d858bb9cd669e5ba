"""Look at the rendered site as a reader does: every page of _docs/ in headless Chromium at 1,400 pixels wide.

For each page: the DOM after its scripts ran (`--dump-dom`), scanned for what a reader must never meet (a Python
traceback, a raw `:::` directive or `{.callout-...}`, maths KaTeX left unrendered, an image whose file is missing,
a code block wider than its column), and a screenshot of the page's first 3,000 pixels to look at. Sliders (range
inputs) are counted. Needs Debian's chromium (`apt-get install chromium`); not part of `make test`.

    python tools/review_site.py [_docs] [--out DIR]      # prints one line per page, writes DIR/<page>.png
"""
import argparse, re, shutil, subprocess, sys, tempfile
from pathlib import Path

FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--hide-scrollbars', '--allow-file-access-from-files', '--virtual-time-budget=8000']
WIDTH = 1400
# the width of code a page shows: compared by Chromium itself in the page (see `WIDTH_PROBE`)
WIDTH_PROBE = """<script>window.addEventListener('load', () => setTimeout(() => {
  const wide = [...document.querySelectorAll('pre')].filter(p => p.scrollWidth > p.clientWidth + 1);
  document.body.setAttribute('data-wide-code', wide.length);
  document.body.setAttribute('data-katex', document.querySelectorAll('.katex').length);
}, 1500));</script>"""


def chromium(*args: str, timeout: int = 120) -> str:
    "Run headless Chromium with a fresh profile; its standard output."
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None: sys.exit("no chromium on this machine: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([exe, *FLAGS, f'--user-data-dir={profile}', *args], capture_output=True,
                              text=True, timeout=timeout)
    return done.stdout


def problems(page: Path, dom: str) -> list[str]:
    "What a reader should not see on `page`, from its rendered DOM."
    text = re.sub(r'<script.*?</script>|<style.*?</style>', '', dom, flags=re.S)
    found = []
    if 'Traceback (most recent call last)' in text: found.append('traceback')
    if re.search(r'(^|>)\s*:::', text) or '{.callout' in text: found.append('raw directive')
    if re.search(r'\$\$[^$]+\$\$', re.sub(r'<pre.*?</pre>|<code.*?</code>', '', text, flags=re.S)):
        found.append('unrendered maths')
    for src in re.findall(r'<img[^>]+src="([^"]+)"', dom):
        if not src.startswith(('data:', 'http')) and not (page.parent / src.split('#')[0]).exists():
            found.append(f'missing image {src}')
    wide = re.search(r'data-wide-code="(\d+)"', dom)
    if wide and int(wide.group(1)): found.append(f'{wide.group(1)} code blocks scroll sideways')
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('docs', nargs='?', default='_docs', type=Path)
    parser.add_argument('--out', type=Path, default=Path(tempfile.gettempdir()) / 'site-review')
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for page in sorted(args.docs.glob('*.html')):
        probe = page.with_name(f'.review-{page.name}')
        probe.write_text(page.read_text().replace('</body>', WIDTH_PROBE + '</body>'))
        try:
            dom = chromium(f'--window-size={WIDTH},900', '--dump-dom', probe.resolve().as_uri())
            chromium(f'--window-size={WIDTH},3000', f'--screenshot={args.out / (page.stem + ".png")}',
                     page.resolve().as_uri())
        finally: probe.unlink()
        issues = problems(page, dom)
        katex = re.search(r'data-katex="(\d+)"', dom)
        sliders = len(re.findall(r'<input[^>]+type="range"', dom))
        bad += bool(issues)
        print(f"{page.name:28s} {'; '.join(issues) or 'ok':40s} maths {katex.group(1) if katex else '?':>4} "
              f"sliders {sliders:2d}  images {len(re.findall('<img', dom)):3d}", flush=True)
    print(f"{bad} pages with problems; screenshots in {args.out}")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
