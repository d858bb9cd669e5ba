"""Calibration split over GPUs: `quantize_model(..., distributed=True)` under torchrun, one process per GPU.

One call of this script under `torchrun --standalone --nproc-per-node N` is one row: a model, a method, N processes.
With N = 1 it runs the plain single-process path (`distributed=False`) and keeps its codes as the reference; with
N > 1 every process takes its share of the calibration samples and the statistics are summed by NCCL all-reduce.
Each row records:
- `wall_s`: quantize_model's wall time (the slowest process), and `speedup` against the N = 1 row when there is one;
- `allreduce_s` (per process) and `allreduce_share`: time inside `torch.distributed.all_reduce`, measured by wrapping
  it with a device synchronisation on both sides (so it includes waiting for the slowest process), over the wall time;
- `allreduce_bytes_per_block`: bytes each process hands to all_reduce per decoder block (GPTQ: one Hessian per group
  of linears sharing an input, float32, and its token count);
- `peak_gib`: torch.cuda.max_memory_allocated per process (on the CPU: the process's peak resident memory);
- `codes_differing` / `codes_total`: codes that differ from the N = 1 run (read from --codes-dir, where every run
  leaves its codes), `ranks_equal`: every process ended with the same codes (a checksum per process compared).
Models: 'course' (SmolLM2-135M, calibration from the novels) and 'llama70b-8' (8 decoder layers of Llama-3-70B's
shapes: hidden 8192, MLP 28672, 64 heads, 8 KV heads; random weights, bfloat16; random calibration tokens,
vocabulary cut to 1024 to keep the embedding small). `--float64` runs the course model in float64, where sums in
another order round alike and the codes are expected equal; in float32/bfloat16 GPTQ carries a rounding difference of
its Hessian into later columns, so some codes differ, and the row counts them.
Rows are merged into --out (default bench/results/distributed_calibration.json) by (model, method, dtype, processes).
`--quick` runs a tiny Llama from a config on the CPU with gloo (`torchrun --nproc-per-node 2 ... --quick`) to show
that the script works; its numbers mean nothing and it writes to the temporary folder unless --out is given.

GPU run (each line is one call, well under 9 minutes; expected times and memory per GPU are estimates, not measured):
  for N in 1 2 4 8; do torchrun --standalone --nproc-per-node $N bench/distributed_calibration.py --model course --method gptq awq; done
      (about 1 min each; under 10 GiB per GPU)
  for N in 1 2 4 8; do torchrun --standalone --nproc-per-node $N bench/distributed_calibration.py --model course --method gptq --float64; done
      (about 2 min each; under 20 GiB per GPU)
  for N in 1 2 4 8; do torchrun --standalone --nproc-per-node $N bench/distributed_calibration.py --model llama70b-8 --method gptq; done
      (3-6 min each at 64 x 512 tokens; about 30 GiB per GPU: 14 GB of bfloat16 weights, a 3.3 GB float32 Hessian
       of down_proj, a copy of one block, the activations of the process's share)
"""
import argparse, copy, datetime, hashlib, json, os, resource, tempfile, time
from pathlib import Path
import torch, torch.distributed as dist
from quantcourse.core import QuantizedLinear, load_model, calibration_samples, decoder_blocks
from quantcourse.api import quantize_model

from benchmeta import run_metadata, sync

SETTINGS = {'gptq': dict(bits=4, group_size=64), 'awq': dict(bits=4, group_size=64)}


class AllReduceClock:
    "Wraps torch.distributed.all_reduce: seconds inside it (device synchronised on both sides), bytes, calls."
    def __init__(self, device):
        self.device, self.seconds, self.bytes, self.calls, self.original = device, 0.0, 0, 0, dist.all_reduce
    def __call__(self, tensor, *args, **kwargs):
        sync(self.device); start = time.perf_counter()
        out = self.original(tensor, *args, **kwargs)
        sync(self.device); self.seconds += time.perf_counter() - start
        self.bytes += tensor.numel() * tensor.element_size(); self.calls += 1
        return out
    def __enter__(self): dist.all_reduce = self; return self
    def __exit__(self, *exc): dist.all_reduce = self.original


def llama70b_stack(layers, device, quick):
    "Decoder layers of Llama-3-70B's shapes (tiny ones with --quick), random weights, built on `device`."
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = (dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2) if quick else
             dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8))
    config = LlamaConfig(vocab_size=1024, num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=5e5,
                         tie_word_embeddings=False, attn_implementation='sdpa', **shape)
    dtype = torch.float32 if quick else torch.bfloat16
    torch.manual_seed(0); default = torch.get_default_dtype(); torch.set_default_dtype(dtype)
    try:
        with torch.device(device): model = LlamaForCausalLM(config).eval()
    finally: torch.set_default_dtype(default)
    return model


def model_and_calibration(args, device):
    "The model on `device` and the whole calibration set (every process holds it; each takes its share)."
    if args.model == 'course':
        dtype = torch.float64 if args.float64 else torch.float32
        model, tokenizer = load_model(dtype=dtype, device=device)
        return model, calibration_samples(tokenizer, args.samples, args.seq_len, seed=0)
    model = llama70b_stack(args.layers, device, args.quick)
    if args.float64: model = model.double()
    tokens = torch.randint(3, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    return model, tokens


def codes_of(model) -> dict:
    "Each quantized layer's integer codes, on the CPU."
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            weight = layer.weight()
            found[name] = getattr(weight, 'quantized', weight).codes.cpu()
    return found


def same_on_every_rank(codes: dict, device) -> bool:
    "Whether every process holds these very codes (a SHA-256 of them, compared by all_reduce MAX of +/- its head)."
    digest = hashlib.sha256()
    for name in sorted(codes): digest.update(codes[name].numpy().tobytes())
    mine = int.from_bytes(digest.digest()[:7], 'little')
    seen = torch.tensor([mine, -mine], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return bool(seen[0] == -seen[1])


def gathered(value: float, device) -> list[float]:
    "`value` of every process, by rank."
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    values[dist.get_rank()] = value
    dist.all_reduce(values)
    return values.tolist()


def peak_gib(device) -> float:
    if device.type == 'cuda': return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_one(args, method, device) -> dict:
    "Quantize with `method` on this process's share; the row (complete on rank 0)."
    world, rank = dist.get_world_size(), dist.get_rank()
    model, calibration = model_and_calibration(args, device)
    blocks = len(decoder_blocks(model)[1])
    settings = dict(SETTINGS[method], **({'grid': 4} if args.quick and method == 'awq' else {}))
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    dist.barrier(); sync(device); start = time.perf_counter()
    with AllReduceClock(device) as clock:
        report = quantize_model(model, method, calibration=calibration, distributed=world > 1, progress=False,
                                **settings)
        sync(device)
    wall = time.perf_counter() - start
    codes = codes_of(model)
    row = dict(model=args.model, method=method, dtype=str(next(model.parameters()).dtype).removeprefix('torch.'),
               processes=world, settings=report.settings, samples=args.samples, seq_len=args.seq_len,
               wall_s=max(gathered(wall, device)), wall_s_per_process=gathered(wall, device),
               allreduce_s=gathered(clock.seconds, device), allreduce_calls=clock.calls,
               allreduce_bytes=clock.bytes, allreduce_bytes_per_block=clock.bytes / blocks,
               peak_gib=gathered(peak_gib(device), device), ranks_equal=same_on_every_rank(codes, device),
               codes_total=sum(c.numel() for c in codes.values()))
    row['allreduce_share'] = max(row['allreduce_s']) / row['wall_s']
    if rank == 0: compare_with_one_process(args, row, codes)
    del model; dist.barrier()
    return row


def codes_file(args, row) -> Path:
    return Path(args.codes_dir) / f"{row['model']}_{row['method']}_{row['dtype']}{'_quick' if args.quick else ''}.pt"


def compare_with_one_process(args, row, codes):
    "Keep the codes of a one-process run; count a several-process run's codes that differ from them."
    path = codes_file(args, row)
    if row['processes'] == 1:
        path.parent.mkdir(parents=True, exist_ok=True); torch.save(codes, path); row['codes_differing'] = 0
        return
    if not path.exists(): row['codes_differing'] = None; return  # run --nproc-per-node 1 first
    alone = torch.load(path)
    row['codes_differing'] = sum((codes[n] != alone[n]).sum().item() for n in codes)
    row['codes_differing_layers'] = sum(bool((codes[n] != alone[n]).any()) for n in codes)


def merge(out: Path, rows: list[dict], device):
    "Put `rows` into the JSON at `out`, replacing rows of the same model, method, dtype and process count."
    key = lambda r: (r['model'], r['method'], r['dtype'], r['processes'], r.get('quick', False))
    old = json.loads(out.read_text())['rows'] if out.exists() else []
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    for r in merged:  # speed against the one-process row of the same model, method and dtype, if recorded
        one = next((o for o in merged if key(o)[:3] == key(r)[:3] and o['processes'] == 1
                    and o.get('quick', False) == r.get('quick', False)), None)
        r['speedup'] = one['wall_s'] / r['wall_s'] if one else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(run_metadata(device), rows=sorted(merged, key=key)), indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=['course', 'llama70b-8'], default='course')
    parser.add_argument('--method', nargs='+', choices=sorted(SETTINGS), default=['gptq'])
    parser.add_argument('--float64', action='store_true', help='the model in float64: codes expected equal')
    parser.add_argument('--samples', type=int, default=None, help='calibration sequences (default 128, 64 for 70B)')
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--layers', type=int, default=8, help='llama70b-8: decoder layers')
    parser.add_argument('--out', default=None, help='JSON to merge the rows into')
    parser.add_argument('--codes-dir', default=None, help='where the one-process codes are kept (default: temp)')
    parser.add_argument('--timeout', type=float, default=600, help='seconds a collective may wait for the others')
    parser.add_argument('--quick', action='store_true', help='tiny sizes on the CPU with gloo')
    args = parser.parse_args()
    if args.quick:
        args.model, args.samples, args.seq_len, args.layers = 'llama70b-8', args.samples or 4, 32, 2
    args.samples = args.samples or (64 if args.model == 'llama70b-8' else 128)
    scratch = Path(tempfile.gettempdir()) / 'quantcourse_distributed'
    args.codes_dir = args.codes_dir or str(scratch / 'codes')
    out = Path(args.out or (scratch / 'distributed_calibration.json' if args.quick else
                            Path(__file__).parent / 'results' / 'distributed_calibration.json'))
    gpu = torch.cuda.is_available() and not args.quick
    local = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local) if gpu else torch.device('cpu')
    if gpu: torch.cuda.set_device(device)
    dist.init_process_group('nccl' if gpu else 'gloo', timeout=datetime.timedelta(seconds=args.timeout),
                            **({'device_id': device} if gpu else {}))
    try:
        rows = [dict(run_one(args, method, device), quick=args.quick) for method in args.method]
        if dist.get_rank() == 0:
            merge(out, rows, device)
            for r in rows:
                print(f"{r['model']} {r['method']} {r['dtype']}, {r['processes']} process(es): {r['wall_s']:.2f} s, "
                      f"all_reduce {max(r['allreduce_s']):.3f} s ({100 * r['allreduce_share']:.1f}%), "
                      f"{r['allreduce_bytes_per_block'] / 2**20:.3f} MiB per block, peak {max(r['peak_gib']):.2f} GiB, "
                      f"ranks equal: {r['ranks_equal']}, codes differing from one process: "
                      f"{r['codes_differing']} of {r['codes_total']}")
            print(f'rows merged into {out}')
    finally: dist.destroy_process_group()


if __name__ == '__main__':
    main()
