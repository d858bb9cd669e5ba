"""What every bench JSON records about its run, and the small device helpers the bench scripts share.

`run_metadata(device)` is the one place that says which code, which card and which software made a result:

- `commit`: the full git hash of the checkout the script ran from, `dirty`: whether its tracked files other than
  bench/results/ differed from that commit (untracked files are not counted), `commit_from`: where the hash came
  from: 'git', or 'QUANTCOURSE_COMMIT' on a machine that has the files but no `.git` (a GPU machine that got a
  copy of the tree): there the caller passes `QUANTCOURSE_COMMIT=$(git rev-parse HEAD)` and `QUANTCOURSE_DIRTY=0|1`
  from the checkout the copy was made of. With neither, all three are None;
- `recorded`: UTC time, ISO 8601 (seconds);
- `device`: the card's name (`torch.cuda.get_device_name`), or the CPU's model name;
- `torch`, `triton` (None when not installed), `cuda` (the CUDA that torch was built with; None on CPU builds),
  `python`;
- `shared_card`: what else ran on the card at the same time, as `$QUANTCOURSE_SHARED_CARD` says (whoever starts
  two jobs on one card sets it for both); None when unset. Seconds measured with it set are not comparable with
  those of a card to itself.
"""
from __future__ import annotations
import datetime, os, platform, subprocess
from pathlib import Path
import torch

REPO = Path(__file__).resolve().parent.parent


def sync(device):
    "Wait for the device's queued work (a no-op on the CPU)."
    if torch.device(device).type == 'cuda': torch.cuda.synchronize(device)


def cpu_name() -> str:
    "The CPU's model name from /proc/cpuinfo, else what `platform` knows."
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine() or 'cpu'


def card_name(device) -> str:
    "The name of the card `device` is on (e.g. 'NVIDIA H200'), or of the CPU."
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()


def _git(*args) -> str:
    return subprocess.run(['git', '-C', str(REPO), *args], capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def git_commit() -> tuple[str | None, bool | None, str | None]:
    "(commit, dirty, where from): git when bench/ sits at the top of a git work tree, else $QUANTCOURSE_COMMIT."
    try:
        if Path(_git('rev-parse', '--show-toplevel')).resolve() == REPO:
            dirty = _git('status', '--porcelain', '--untracked-files=no', '--', '.', ':(exclude)bench/results')
            return _git('rev-parse', 'HEAD'), bool(dirty), 'git'
    except (OSError, subprocess.SubprocessError): pass  # no git, or no .git here: a copied tree
    commit = os.environ.get('QUANTCOURSE_COMMIT') or None
    if commit is None: return None, None, None
    dirty = os.environ.get('QUANTCOURSE_DIRTY', '').strip().lower()
    return commit, {'1': True, 'true': True, '0': False, 'false': False}.get(dirty), 'QUANTCOURSE_COMMIT'


def run_metadata(device) -> dict:
    "Commit (and whether the tree was dirty), UTC time, card name and software versions of this run."
    try: import triton; triton_version = triton.__version__
    except ImportError: triton_version = None
    commit, dirty, source = git_commit()
    return dict(device=card_name(device), commit=commit, dirty=dirty, commit_from=source,
                recorded=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
                shared_card=os.environ.get('QUANTCOURSE_SHARED_CARD') or None)


if __name__ == '__main__':  # print this machine's metadata: a quick check that git (or the variables) are seen
    import json
    print(json.dumps(run_metadata('cuda' if torch.cuda.is_available() else 'cpu'), indent=1))
