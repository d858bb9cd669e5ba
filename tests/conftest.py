import os, pytest, torch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('QUANTCOURSE_CACHE', str(ROOT/'.cache'))

@pytest.fixture(scope='session')
def course_model():
    "The course model and tokenizer on the CPU, loaded once per test session."
    from quantcourse.core import load_model
    torch.manual_seed(0)
    return load_model(device='cpu')
