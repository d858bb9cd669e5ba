"""One process of tests/test_distributed.py: quantize a tiny Llama with `distributed=True` and write what it saw.

Run as `python distributed_worker.py RANK WORLD RENDEZVOUS_FILE OUT_FOLDER SCENARIO`; started by the test, two at once,
as plain processes joined by a gloo group (not torchrun, whose agent would kill the survivors when one process dies).
"""
import datetime, json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_models
from quantcourse.core import METHODS, calibration_shards, shard_span
from quantcourse.api import quantize_model, save_quantized

BLOCK_0 = [f'model.layers.0.{n}' for n in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj',
                                            'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')]
# GPTQ over both blocks (the second calibrated on the first's quantized output); AWQ with its clip search on block 0
CASES = {'gptq': dict(group_size=32), 'awq': dict(group_size=32, clip=True, grid=4, names=BLOCK_0)}
SAMPLES, SEQ_LEN = 4, 16  # 2 samples a process

def error_of(call) -> str:
    try: call()
    except (ValueError, RuntimeError) as e: return f'{type(e).__name__}: {e}'
    return 'no error'

def quantized(method, arch='llama', samples=SAMPLES, distributed=True, **settings):
    model = tiny_models.build(arch).double()  # float64: sums in another order round alike
    quantize_model(model, method, calibration=tiny_models.calibration(samples, SEQ_LEN), distributed=distributed,
                   progress=False, **(CASES.get(method, {}) | settings))
    return model

def die_on_call(count):
    "Make GPTQ's statistics end this process, without a word, on their `count`-th call."
    spec, original, calls = METHODS['gptq'], METHODS['gptq'].collect, []
    def collect(x):
        calls.append(1)
        if len(calls) == count: os._exit(3)
        return original(x)
    spec.collect = collect

def main(rank: int, world: int, rendezvous: str, out: str, scenario: str):
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    if scenario == 'equal':
        for method in CASES:
            model = quantized(method)
            save_quantized(model, f'{out}/{method}.safetensors', distributed=True)
            save_quantized(model, f'{out}/{method}_rank{rank}.safetensors')  # each process's own
        # one process alone, for comparison: the two processes share the work
        method = list(CASES)[rank]
        save_quantized(quantized(method, distributed=False), f'{out}/{method}_alone.safetensors')
        with calibration_shards(): results['span'] = shard_span(rank + 3)
        results['too_few'] = error_of(lambda: quantized('gptq', samples=1))
        results['mismatch'] = error_of(lambda: quantized('gptq', arch='llama' if rank == 0 else 'qwen2'))
        results['not_shardable'] = error_of(lambda: quantized('smoothquant'))
    elif scenario == 'dies':  # process 1 dies at the third group of linears (block 0, attention's o_proj)
        if rank == 1: die_on_call(3)
        results['error'] = error_of(lambda: save_quantized(quantized('gptq', names=BLOCK_0),
                                                           f'{out}/gptq.safetensors', distributed=True))
    elif scenario == 'dies_before_save':  # every statistic summed, then process 1 dies before the save
        model = quantized('gptq', names=BLOCK_0)
        if rank == 1: os._exit(3)
        results['error'] = error_of(lambda: save_quantized(model, f'{out}/gptq.safetensors', distributed=True))
    with open(f'{out}/rank{rank}.json', 'w') as f: json.dump(results, f)
    if scenario == 'equal': dist.destroy_process_group()
    else: os._exit(0)  # a group with a dead member: nothing left to tidy

if __name__ == '__main__':
    rank, world, rendezvous, out, scenario = sys.argv[1:]
    main(int(rank), int(world), rendezvous, out, scenario)
