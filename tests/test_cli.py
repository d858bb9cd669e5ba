"`python -m quantcourse`: quantize the course model into a folder, eval it, and the errors a command line can make."
import copy, dataclasses, os, subprocess, sys
import pytest
from quantcourse.core import evaluate, get_budget, linear_names
from quantcourse.api import quantize_model, main
from conftest import ROOT

EVAL_TOKENS = 256

def run(*argv):
    "Run `python -m quantcourse *argv` in a fresh process on the CPU; the finished process."
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES='')
    return subprocess.run([sys.executable, '-m', 'quantcourse', *map(str, argv)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)

def summary(stdout: str) -> dict:
    "The summary table `main` prints, as a dict of strings."
    return dict(line.split(maxsplit=1) for line in stdout.splitlines() if line.strip())

def test_quantize_then_eval_matches_the_same_calls_in_process(tmp_path, course_model):
    out = tmp_path/'rtn'
    done = run('quantize', '--method', 'rtn', '--bits', 4, '--group-size', 64, '--only', 'model.layers.0.',
               '--only', 'model.layers.29.', '--out', out, '--device', 'cpu')
    assert done.returncode == 0, done.stderr
    done_quantize, printed = done, summary(done.stdout)
    assert printed['method'] == 'rtn' and printed['layers'] == '14'
    assert (out/'model.safetensors').exists() and (out/'recipe.json').exists()
    done = run('eval', out, '--eval-tokens', EVAL_TOKENS, '--budget', 'small', '--device', 'cpu', '--no-progress')
    assert done.returncode == 0, done.stderr
    printed = summary(done.stdout)
    model, tokenizer = course_model
    quantized = copy.deepcopy(model)
    names = [n for n in linear_names(model) if n.startswith(('model.layers.0.', 'model.layers.29.'))]
    report = quantize_model(quantized, 'rtn', bits=4, group_size=64, names=names, progress=False)
    assert report.bits_per_weight == pytest.approx(float(summary(done_quantize.stdout)["bits_per_weight"]), abs=1e-4)
    budget = dataclasses.replace(get_budget('small'), eval_tokens=EVAL_TOKENS)
    expected = evaluate(quantized, tokenizer, budget, progress=False)['perplexity']
    assert float(printed['perplexity']) == pytest.approx(expected, rel=1e-5)
    assert (printed['tokens'], printed['context']) == (str(EVAL_TOKENS), str(budget.context))

def test_gguf_file_type_writes_a_gguf_file(tmp_path, capsys):
    from quantcourse.gguf import read_gguf
    assert main(['quantize', '--method', 'q8_0', '--gguf', str(tmp_path/'m.gguf'), '--device', 'cpu']) == 0
    assert summary(capsys.readouterr().out)['file_type'] == 'Q8_0'
    types = {t.name: t.tensor_type.name for t in read_gguf(tmp_path/'m.gguf').tensors}
    assert types['blk.0.attn_q.weight'] == 'Q8_0' and types['blk.0.attn_norm.weight'] == 'F32'

def test_a_bad_command_line_exits_2_with_one_line(tmp_path):
    done = run('quantize', '--method', 'int3', '--out', tmp_path)
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.count('\n') == 1 and "method 'int3' is unknown; use one of" in done.stderr

@pytest.mark.parametrize('argv, message', [
    (['quantize', '--method', 'int3', '--out', '{tmp}'], "method 'int3' is unknown; use one of"),
    (['quantize', '--method', 'nf4', '--bits', '4', '--out', '{tmp}'], "nf4 has no setting 'bits'"),
    (['quantize', '--method', 'rtn', '--set', 'symmetric=maybe', '--out', '{tmp}'], "not true or false"),
    (['quantize', '--method', 'rtn', '--set', 'bits', '--out', '{tmp}'], "NAME=VALUE"),
    (['quantize', '--bits', 'four', '--out', '{tmp}'], "'four' is not a whole number"),
    (['quantize', '--group-size', '0', '--out', '{tmp}'], "0 must be at least 1"),
    (['quantize', '--calib-samples', '-3', '--out', '{tmp}'], "-3 must be at least 1"),
    (['quantize', './no/such/model', '--out', '{tmp}'], "does not exist"),
    (['quantize', '--only', 'nowhere', '--out', '{tmp}'], "matches no linear layer"),
    (['quantize', 'missing.gguf', '--out', '{tmp}'], "does not exist"),
    (['quantize', '--method', 'rtn'], "give --out DIR"),
    (['quantize', '--method', 'rtn', '--out', '{tmp}', '--gguf', 'x.gguf'], "give --out DIR"),
    (['quantize', '--method', 'rtn', '--gguf', '{tmp}/x.gguf'], "--gguf writes llama.cpp file types"),
    (['quantize', '--method', 'Q4_K_M', '--gguf', '{tmp}/no/x.gguf'], "does not exist; create it"),
    (['quantize', '--out', '{tmp}/file'], "is a file; give a folder"),
    (['eval', '{tmp}/missing'], "does not exist"),
    (['eval', '{tmp}'], "has no recipe.json and model.safetensors"),
    (['eval', '{tmp}', '--text', '{tmp}/missing.txt'], "--text {tmp}/missing.txt is not a file"),
    (['eval', '{tmp}', '--budget', 'huge'], "invalid choice: 'huge'"),
    (['squash'], "invalid choice: 'squash'"),
])
def test_each_mistake_is_one_line_and_status_2(argv, message, tmp_path, capsys):
    (tmp_path/'file').write_text('not a folder')
    assert main([a.replace('{tmp}', str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith('python -m quantcourse: error: ') and err.count('\n') == 1
    assert message.replace('{tmp}', str(tmp_path)) in err
