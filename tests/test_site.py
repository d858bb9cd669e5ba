"Render the website and check it: one page per notebook, titles, images where notebooks plot, no broken links to images."
import json, re, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'tools'))
from render_site import render

@pytest.fixture(scope='module')
def site():
    index = render(ROOT)
    return index.parent

def _notebooks():
    return sorted((ROOT/'nbs').glob('*.ipynb'))

def _title(nb: Path) -> str:
    for cell in json.loads(nb.read_text())['cells']:
        if cell['cell_type'] == 'markdown':
            m = re.search(r'^# (.+)$', ''.join(cell['source']), re.M)
            if m: return m.group(1).strip()
    raise AssertionError(f'{nb.name} has no title')

def _has_plot(nb: Path) -> bool:
    return any('image/png' in o.get('data', {}) for c in json.loads(nb.read_text())['cells'] for o in c.get('outputs', []))

def test_index_and_one_page_per_notebook(site):
    assert (site/'index.html').exists()
    for nb in _notebooks():
        page = site/f'{nb.stem}.html'
        assert page.exists(), f'no page for {nb.name}'
        html = page.read_text()
        assert _title(nb) in html, f'{page.name} lacks its title {_title(nb)!r}'
        if _has_plot(nb): assert '<img' in html, f'{page.name} lost the plots of {nb.name}'

def test_images_exist_and_no_raw_directives(site):
    for page in site.glob('*.html'):
        html = page.read_text()
        assert '#| ' not in html and ':::' not in html, f'{page.name} shows raw directives'
        for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
            if src.startswith('data:') or src.startswith('http'): continue
            assert (page.parent/src).exists(), f'{page.name}: broken image {src}'

def _sidebar(html: str) -> str:
    "The HTML of the page's sidebar navigation."
    start = html.index('<nav id="quarto-sidebar"')
    return html[start:html.index('</nav>', start)]

def test_sidebar_lists_only_pages(site):
    links = re.findall(r'href="([^"]+)"', _sidebar((site/'index.html').read_text()))
    assert links, 'the sidebar is empty'
    for link in links:
        assert link.endswith('.html') and (site/link).exists(), f'the sidebar links {link}, which is not a page'

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
_PROBE = """<script>window.addEventListener('load',function(){var out=[];document.querySelectorAll('.qc-slider').forEach(
function(s){var i=s.querySelector('input'),m=s.querySelector('img'),a=m.src;i.value=(+i.value+1)%(+i.max+1);
i.dispatchEvent(new Event('input'));out.push((a!==m.src)+'|'+s.querySelector('output').textContent);});
document.body.setAttribute('data-sliders',out.join(';'));});</script></body>"""

@pytest.mark.skipif(not CHROMIUM, reason='needs Chromium (Debian: apt-get install chromium)')
def test_sliders_move_in_headless_chromium(site, tmp_path):
    "Every slider on the site shows a figure, and moving it changes the figure and its caption."
    pages = [p for p in site.glob('*.html') if 'qc-slider' in p.read_text()]
    assert pages, 'no slider on the site'
    for page in pages:
        probe = page.parent/f'_probe_{page.name}'
        probe.write_text(page.read_text().replace('</body>', _PROBE))
        try:
            dom = subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                                  '--disable-component-update', '--disable-sync', f'--user-data-dir={tmp_path}',
                                  '--virtual-time-budget=5000', '--dump-dom', probe.as_uri()],
                                 capture_output=True, text=True, timeout=120).stdout
        finally: probe.unlink()
        result = re.search(r'data-sliders="([^"]*)"', dom)
        assert result and result.group(1), f'{page.name}: sliders did not run'
        for slider in result.group(1).split(';'):
            assert slider.startswith('true|'), f'{page.name}: a slider did not change its figure ({slider})'

def test_every_notebook_in_the_sidebar(site):
    sidebar = (ROOT/'nbs'/'sidebar.yml').read_text()
    html = (site/'index.html').read_text()
    for nb in _notebooks():
        assert nb.name in sidebar, f'{nb.name} is missing from nbs/sidebar.yml'
        assert f'{nb.stem}.html' in _sidebar(html), f'the sidebar does not link {nb.stem}.html'
