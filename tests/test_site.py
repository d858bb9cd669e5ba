"Render the website and check it: one page per notebook, titles, images where notebooks plot, no broken links to images, callouts."
import json, re, shutil, subprocess, sys
from html import unescape
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

def _chromium_dom(page: Path, probe: str, profile: Path, window: str = '1400,900') -> str:
    "The DOM of `page` after headless Chromium loaded it, in a `window` of width,height pixels, with the script `probe` (ending in `</body>`) added."
    copy = page.parent/f'_probe_{page.name}'
    copy.write_text(page.read_text().replace('</body>', probe))
    try:
        return subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                               '--disable-component-update', '--disable-sync', f'--user-data-dir={profile}',
                               f'--window-size={window}', '--virtual-time-budget=5000', '--dump-dom', copy.as_uri()],
                              capture_output=True, text=True, timeout=120).stdout
    finally: copy.unlink()

@pytest.mark.skipif(not CHROMIUM, reason='needs Chromium (Debian: apt-get install chromium)')
def test_sliders_move_in_headless_chromium(site, tmp_path):
    "Every slider on the site shows a figure, and moving it changes the figure and its caption."
    pages = [p for p in site.glob('*.html') if 'qc-slider' in p.read_text()]
    assert pages, 'no slider on the site'
    for page in pages:
        result = re.search(r'data-sliders="([^"]*)"', _chromium_dom(page, _PROBE, tmp_path))
        assert result and result.group(1), f'{page.name}: sliders did not run'
        for slider in result.group(1).split(';'):
            assert slider.startswith('true|'), f'{page.name}: a slider did not change its figure ({slider})'

def test_every_notebook_in_the_sidebar(site):
    sidebar = (ROOT/'nbs'/'sidebar.yml').read_text()
    html = (site/'index.html').read_text()
    for nb in _notebooks():
        assert nb.name in sidebar, f'{nb.name} is missing from nbs/sidebar.yml'
        assert f'{nb.stem}.html' in _sidebar(html), f'the sidebar does not link {nb.stem}.html'

CALLOUT_KINDS = ('note', 'tip', 'warning', 'important', 'caution')
_CALLOUT_DIV = re.compile(r'^:{3,}[ \t]*\{\.callout-(' + '|'.join(CALLOUT_KINDS) + r')\b([^}]*)\}[ \t]*\n(?:#+[ \t]+(.+)\n)?', re.M)

def _plain(text: str) -> str:
    "`text` without tags, entities, backticks, curly apostrophes or repeated spaces, to compare a title with its rendering."
    text = unescape(re.sub(r'<[^>]+>', '', text)).replace('`', '').replace('\u2019', "'").replace('\u2018', "'")
    return ' '.join(text.split())

def _callouts(nb: Path) -> list[tuple[str, str]]:
    "(kind, title or '') of every `::: {.callout-*}` div in the markdown cells of `nb`, in order."
    found = []
    for cell in json.loads(nb.read_text())['cells']:
        if cell['cell_type'] != 'markdown': continue
        for m in _CALLOUT_DIV.finditer(''.join(cell['source'])):
            attr = re.search(r'title="([^"]*)"', m.group(2))
            found.append((m.group(1), _plain(attr.group(1) if attr else m.group(3) or '')))
    return found

def _rendered_callouts(page: str) -> list[tuple[str, str]]:
    "(kind, header text) of every callout box in the HTML `page`, in order."
    found = []
    for m in re.finditer(r'<div class="([^"]*)"', page):
        classes = m.group(1).split()
        if 'callout' not in classes: continue
        kind = next((c[8:] for c in classes if c[:8] == 'callout-' and c[8:] in CALLOUT_KINDS), '')
        end = page.find('callout-body', m.end())
        header = page[m.end():end if end >= 0 else len(page)]
        title = re.search(r'class="callout-title-container[^"]*">(.*?)</div>', header, re.S)
        found.append((kind, _plain(title.group(1)) if title else ''))
    return found

def test_callouts_become_callout_boxes(site):
    "Every `::: {.callout-*}` div of a notebook is a callout box of that kind on its page, headed by its title."
    total = 0
    for nb in _notebooks():
        expected, rendered = _callouts(nb), _rendered_callouts((site/f'{nb.stem}.html').read_text())
        assert [k for k, _ in rendered] == [k for k, _ in expected], \
            f'{nb.stem}.html has the callouts {rendered}; {nb.name} has {expected}'
        for (kind, title), (_, header) in zip(expected, rendered):
            if title: assert header == title, f'{nb.stem}.html: the {kind} callout is headed {header!r}, not {title!r}'
        total += len(expected)
    assert total, 'no `::: {.callout-*}` in the notebooks: the pattern or the notebooks changed'

_CALLOUT_PROBE = """<script>window.addEventListener('load',function(){var out=[];document.querySelectorAll('.callout').forEach(
function(c){var s=getComputedStyle(c),h=c.querySelector('.callout-header'),r=c.getBoundingClientRect();
out.push([parseFloat(s.borderLeftWidth),s.borderLeftStyle,h?getComputedStyle(h).backgroundColor:'none',Math.round(r.height)].join('|'));});
document.body.setAttribute('data-callouts',out.join(';'));});</script></body>"""

@pytest.mark.skipif(not CHROMIUM, reason='needs Chromium (Debian: apt-get install chromium)')
def test_callouts_are_boxes_in_headless_chromium(site, tmp_path):
    "Every callout on the site is drawn as a box: a solid left border, a tinted header and some height."
    pages = [p for p in site.glob('*.html') if _rendered_callouts(p.read_text())]
    assert pages, 'no callout on the site'
    for page in pages:
        result = re.search(r'data-callouts="([^"]*)"', _chromium_dom(page, _CALLOUT_PROBE, tmp_path))
        assert result and result.group(1), f'{page.name}: the browser found no callout'
        boxes = result.group(1).split(';')
        assert len(boxes) == len(_rendered_callouts(page.read_text())), f'{page.name}: {boxes}'
        for box in boxes:
            width, style, header, height = box.split('|')
            assert float(width) >= 2 and style == 'solid', f'{page.name}: a callout has no left border ({box})'
            assert header not in ('none', 'transparent', 'rgba(0, 0, 0, 0)'), f'{page.name}: a callout header is not tinted ({box})'
            assert int(height) > 20, f'{page.name}: a callout is flat ({box})'



def test_module_lines_fit_the_site():
    "Generated module lines fit 100 columns once tools/wrap_exports.py rewraps nbdev's docstring and `__all__`."
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location('wrap_exports', root / 'tools' / 'wrap_exports.py')
    wrap = importlib.util.module_from_spec(spec); spec.loader.exec_module(wrap)
    # wrapped here too: a notebook's own export cell, run by the notebook tests, writes nbdev's widths back
    long = [f'{p.name}:{i}' for p in sorted((root / 'quantcourse').glob('*.py')) if p.name != '_modidx.py'
            for i, line in enumerate(wrap.wrap_module(p.read_text()).splitlines(), 1) if len(line) > 100]
    assert long == [], f"lines over 100 characters: {long}; wrap them in the notebook cell"

WINDOW, SCROLLBAR, LINE = 1400, 15, 100  # a reader's window (pixels), its scrollbar, the longest code line to fit unwrapped
MONO_EM = 0.61  # the advance of one monospace character in em (DejaVu Sans Mono, Menlo 0.602; Liberation Mono 0.6)

def _block(css: str, selector: str) -> str:
    "The declarations of every rule of `css` whose whole selector is `selector`, joined in order."
    return ' '.join(re.findall(r'(?:^|[};])\s*' + re.escape(selector) + r'\s*\{([^}]*)\}', css, re.M))

def _length(value: str, rem: float) -> float:
    "Pixels of a CSS length in px or rem."
    number, unit = re.fullmatch(r'\s*([\d.]+)(px|rem)\s*', value).groups()
    return float(number) * (rem if unit == 'rem' else 1)

def _css_layout(site: Path) -> dict:
    "The widths (pixels) that smalldocs' grid uses, with the course's styles.css read after smalldocs.css as on every page."
    css = (site/'site_libs'/'smalldocs.css').read_text() + '\n' + (site/'styles.css').read_text()
    rem = float(re.search(r'html\s*\{[^}]*font-size:\s*var\(--sd-root-font-size,\s*([\d.]+)px\)', css).group(1))
    found = {}
    for selector in (':root', '#quarto-content'):
        for name, value in re.findall(r'(--[\w-]+)\s*:\s*([^;]+)', _block(css, selector)): found[name] = value
    widths = {k: _length(found[f'--{k}'], rem) for k in ('sd-sidebar-width', 'sd-margin-width', 'sd-body-width', 'sd-gap', 'sd-pad')}
    return dict(widths, rem=rem, code_font=_length(found['--qc-code-font-size'], rem))

def test_code_lines_of_100_characters_fit_a_1400_pixel_window(site):
    "In a 1,400-pixel window the body column holds a 100-character code line, and longer lines wrap rather than scroll."
    w = _css_layout(site)
    beside = w['sd-sidebar-width'] + w['sd-margin-width'] + 2 * w['sd-gap'] + 2 * w['sd-pad']
    body = min(w['sd-body-width'], WINDOW - SCROLLBAR - beside)
    needed = LINE * MONO_EM * w['code_font'] + 2 * w['rem']  # the characters and the block's padding of 1rem a side
    assert body >= needed, f'the body column is {body:.0f} px at {WINDOW} px; a {LINE}-character code line needs {needed:.0f} px'
    styles = (site/'styles.css').read_text()
    assert re.search(r'^pre\b[^{]*\{[^}]*font-size:\s*var\(--qc-code-font-size\)', styles, re.M), 'styles.css no longer sizes code by --qc-code-font-size'
    assert re.search(r'div\.sourceCode pre[^{]*\{[^}]*white-space:\s*pre-wrap', styles), 'code blocks no longer wrap long lines'
    assert re.search(r'\.cell-output pre[^{]*\{[^}]*white-space:\s*pre-wrap', styles), 'printed output no longer wraps long lines'

# Notebooks exempt from the width check (none now): a name here must come with a reason.
NOT_YET_WRAPPED: set[str] = set()
# Lines that cannot be wrapped without changing the program, each with its reason: (notebook, the line stripped)
UNWRAPPABLE = {
    ('03_outliers.ipynb', 'f"{(attention_input.abs().argmax(1) == attention_input.abs().amax(0).argmax())'
                          '.float().mean():.0%} "'):
        'one f-string replacement field of 95 characters: Python 3.11 cannot break a line inside it',
}

def test_notebook_code_lines_fit_the_site():
    "Every code line of the notebooks fits the site's 100-character code column, so no cell wraps on the page."
    found, long = set(), []
    for nb in _notebooks():
        if nb.name in NOT_YET_WRAPPED: continue
        for cell in json.loads(nb.read_text())['cells']:
            if cell['cell_type'] != 'code': continue
            for line in ''.join(cell['source']).splitlines():
                if len(line) <= LINE: continue
                if (nb.name, line.strip()) in UNWRAPPABLE: found.add((nb.name, line.strip())); continue
                long.append(f"{nb.name} cell {cell.get('id')}: {len(line)} characters: {line.strip()[:50]}")
    assert long == [], f"{len(long)} code lines over {LINE} characters; wrap them:\n" + '\n'.join(long)
    stale = set(UNWRAPPABLE) - found
    assert not stale, f'UNWRAPPABLE lists lines that are gone or fit now; remove them: {sorted(stale)}'

_WIDTH_PROBE = """<script>window.addEventListener('load',function(){var out=[];document.querySelectorAll('main pre').forEach(
function(p){if(p.scrollWidth>p.clientWidth+1)out.push('scrolls:'+p.textContent.slice(0,60));});
var p=document.querySelector('div.sourceCode pre'),s=document.createElement('span');s.textContent='x'.repeat(LINE);
p.appendChild(document.createElement('br'));p.appendChild(s);var cs=getComputedStyle(p);
var room=p.clientWidth-parseFloat(cs.paddingLeft)-parseFloat(cs.paddingRight);
if(s.getClientRects().length!==1||s.getBoundingClientRect().width>room+0.5)out.push('a LINE-character line wraps: room '+room);
if(document.documentElement.scrollWidth>window.innerWidth)out.push('the page scrolls sideways');
document.querySelectorAll('#quarto-margin-sidebar, #quarto-sidebar').forEach(function(e){
if(e.scrollWidth>e.clientWidth+1)out.push(e.id+' scrolls sideways');});
document.body.setAttribute('data-width',out.join(';')||'ok');});</script></body>"""

@pytest.mark.skipif(not CHROMIUM, reason='needs Chromium (Debian: apt-get install chromium)')
def test_no_code_scrolls_sideways_in_headless_chromium(site, tmp_path):
    "In a 1,400-pixel window no code block, output or sidebar of any page scrolls sideways, and a 100-character line stays on one line."
    probe = _WIDTH_PROBE.replace('LINE', str(LINE))
    for page in sorted(site.glob('*.html')):
        if 'div class="sourceCode' not in page.read_text(): continue
        result = re.search(r'data-width="([^"]*)"', _chromium_dom(page, probe, tmp_path, f'{WINDOW},900'))
        assert result, f'{page.name}: the probe did not run'
        assert unescape(result.group(1)) == 'ok', f'{page.name}: {unescape(result.group(1))}'

def test_widgets_without_html_show_a_note_not_their_repr(site):
    "A widget output that has no HTML of its own (an ipywidgets box) shows a line saying it runs in Jupyter, not `VBox(children=...)`."
    from render_site import WIDGET, WIDGET_NOTE
    for nb in _notebooks():
        page = (site/f'{nb.stem}.html').read_text()
        for out in (o for c in json.loads(nb.read_text())['cells'] for o in c.get('outputs', [])):
            data = out.get('data', {})
            if WIDGET not in data or 'text/html' in data: continue
            plain = ''.join(data.get('text/plain', ''))
            assert plain[:40] not in unescape(page), f'{nb.stem}.html shows a widget as its repr {plain[:40]!r}'
            assert WIDGET_NOTE.strip('*')[:40] in page, f'{nb.stem}.html lacks the note for a widget'

def test_no_empty_output_boxes(site):
    "A stream output of only whitespace (a cleared progress bar's newline) does not become an empty box on a page."
    for page in site.glob('*.html'):
        assert not re.search(r'cell-output-std(?:err|out)">\s*<pre><code>\s*</code>', page.read_text()), f'{page.name} has an empty output box'
