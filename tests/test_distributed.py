"""quantize_model(..., distributed=True): two CPU processes joined by gloo give the codes one process gives, refuse
bad input on every process, and stop with a clear error, writing nothing, when one of them dies."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
import tiny_models
from quantcourse.api import load_quantized, quantize_model
from quantcourse.core import QuantizedLinear

WORKER = Path(__file__).with_name('distributed_worker.py')
SCENARIOS = ('equal', 'dies', 'dies_before_save')

def start(scenario: str, folder: Path) -> list[subprocess.Popen]:
    "Two worker processes of `scenario`, writing into `folder`."
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH', '')]))
    return [subprocess.Popen([sys.executable, str(WORKER), str(rank), '2', str(folder / 'rendezvous'), str(folder),
                              scenario], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(2)]

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Every scenario's two processes, all started at once (the machine's cores share them), then their folders."
    root = tmp_path_factory.mktemp('distributed')
    started = {s: start(s, root / s) for s in SCENARIOS}
    for scenario, processes in started.items():
        for rank, p in enumerate(processes):
            log, _ = p.communicate(timeout=240)
            expected = 3 if scenario != 'equal' and rank == 1 else 0  # the process that dies exits with 3
            assert p.returncode == expected, f'{scenario}, rank {rank} exited with {p.returncode}:\n{log[-3000:]}'
    return root

def result(runs, scenario, rank=0) -> dict: return json.loads((runs / scenario / f'rank{rank}.json').read_text())

def codes(path) -> dict:
    "Each quantized layer's integer codes, from a file `save_quantized` wrote."
    model = load_quantized(path, tiny_models.build('llama').double())
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            weight = layer.weight()
            found[name] = getattr(weight, 'quantized', weight).codes  # a GPTQWeight holds a QuantizedWeight
    return found

@pytest.mark.parametrize('method', ['gptq', 'awq'])
def test_two_processes_give_the_codes_of_one(runs, method):
    folder = runs / 'equal'
    saved, own = load_file(folder / f'{method}.safetensors'), load_file(folder / f'{method}_rank1.safetensors')
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in saved)  # every process alike
    two, one = codes(folder / f'{method}.safetensors'), codes(folder / f'{method}_alone.safetensors')
    assert two.keys() == one.keys() and len(two) == {'gptq': 14, 'awq': 7}[method]
    differing = sum((two[n] != one[n]).sum().item() for n in two)
    total = sum(c.numel() for c in two.values())
    # float64: a code may differ only where the order of a sum moved a value across a rounding tie; none seen
    assert differing <= total // 10_000, f'{differing} of {total} codes differ from one process'
    assert not list(folder.glob('*.partial'))

def test_shard_span_orders_the_rows_by_rank(runs):
    assert result(runs, 'equal', 0)['span'] == [0, 7] and result(runs, 'equal', 1)['span'] == [3, 7]

@pytest.mark.parametrize('case, message', [
    ('too_few', 'calibration has 1 samples for 2 processes'),
    ('mismatch', 'the processes were given different models or calls'),
    ('not_shardable', 'smoothquant cannot split its calibration over processes')])
def test_bad_input_is_refused_on_every_process(runs, case, message):
    for rank in range(2): assert message in result(runs, 'equal', rank)[case]

@pytest.mark.parametrize('scenario, message', [
    ('dies', 'calibration over processes stopped on rank 0: an all_reduce failed'),
    ('dies_before_save', 'not written, a process failed before the save')])
def test_a_process_that_dies_stops_the_others_and_nothing_is_written(runs, scenario, message):
    assert message in result(runs, scenario)['error']
    assert [p.name for p in (runs / scenario).iterdir() if p.suffix in ('.safetensors', '.partial')] == []

def test_distributed_needs_a_process_group():
    with pytest.raises(ValueError, match='needs torch.distributed set up'):
        quantize_model(tiny_models.build('llama'), 'gptq', calibration=tiny_models.calibration(2, 8),
                       distributed=True, progress=False)

def test_distributed_save_needs_a_process_group(tmp_path):
    from quantcourse.api import save_quantized
    model = tiny_models.build('llama'); quantize_model(model, 'rtn', progress=False)
    with pytest.raises(ValueError, match='needs torch.distributed set up'):
        save_quantized(model, tmp_path / 'model.safetensors', distributed=True)
    assert list(tmp_path.iterdir()) == []
