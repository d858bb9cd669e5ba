"""One comparison, one run: every method of the course on the course model, the same tokens and context (chapter 10).

Each row quantizes a fresh copy of SmolLM2-135M-Instruct (float32) on the card, then measures on the same tokens (the
whole of *Pride and Prejudice* at context 1024 under budget 'full'):
- perplexity, and the mean KL divergence from the float model's next-token distribution to the quantized model's
  (`kl_to_reference`, both models run on every window), with the share of tokens whose top choice is the same;
- bits per weight over the decoder blocks' linear layers (what each method stores, scales included);
- the size of the file a user would keep: `save_quantized`'s safetensors for our layers (the float embedding, tied
  with the output head, included), the GGUF file for llama.cpp's file types, the NF4 base plus peft-format adapters
  for QLoRA;
- quantization seconds (device synchronized; for GGUF, writing the file on the host's CPU, as llama.cpp's quantizer
  runs there), peak GPU memory (`max_memory_allocated`, reset per row);
- decode tokens/s: greedy `generate` of 128 new tokens after a 32-token prompt, batch 1, KV cache, eager, median of 3
  after a warm-up, with the layers' own forward (each dequantizes its weight per call, NF4 and FP4 by chapter 07's
  fused Triton kernel, the rest in torch: chapter 09's kernels are not wired into the layers yet, so these are not
  the kernels' speeds). Not measured for GGUF rows (the file is
  read back by transformers into float weights; llama.cpp's speed is its own).
Rows:
- float; RTN, GPTQ (act order, static groups), AWQ (scales, the registered defaults), AWQ then GPTQ, HQQ, rotation
  + GPTQ (both sides of every weight rotated) at 4 and 3 bits, groups of 64, asymmetric; NF4 and FP4 (block 64,
  double-quantized scales); LLM.int8() (threshold 6); SmoothQuant W8A8 (alpha 0.5, per-token); MXFP4 and NVFP4;
- GGUF file types Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0: `write_gguf` (chapter 06; its Q4_K/Q5_K/Q6_K without an importance
  matrix, as `llama-quantize` without `--imatrix`), the file read back by transformers (`load_model(path)`); every
  tensor, the embedding too, holds what the file holds;
- QLoRA's effect: the NF4 model above with LoRA (r 8, alpha 16, all linears) trained as chapter 08 does (200 steps of
  8 x 256 tokens of the other five novels, lr 1e-3, 2 warm-up steps, cosine), then measured like the rest. It is the
  only row whose weights saw text after quantization: a lower perplexity than float is fine-tuning on Austen, not
  quantization.
Calibration (GPTQ, AWQ, SmoothQuant): 128 x 2048 tokens of the other five novels, seed 0, as every chapter's full runs.

    python bench/guide_gpu.py                     # everything, ~15 minutes on one H100 (estimate)
    python bench/guide_gpu.py --only 'GPTQ INT4 g64' --out x.json   # a subset; rows merge by label
    python bench/guide_gpu.py --only 'RTN INT3 g64' --no-decode   # no decode timing (~45 s a row saved)
    python bench/guide_gpu.py --quick             # two blocks, tiny data, anywhere: shows the script works
"""
from __future__ import annotations
import argparse, copy, json, statistics, sys, tempfile, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
from quantcourse.core import (Budget, load_model, get_budget, calibration_samples, eval_tokens, kl_to_reference,
                              model_bits, default_device, EVALUATION_NOVEL, CALIBRATION_NOVELS)
from quantcourse.api import quantize_model, save_quantized
from quantcourse.gguf import write_gguf, gguf_mix, gguf_name, mix_bits
from quantcourse.qlora import with_adapters, train_lora, save_adapters
from benchmeta import run_metadata, sync

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / 'results' / 'guide_gpu.json'
G64 = dict(group_size=64)
GPTQ_BEST = dict(act_order=True, static_groups=True)  # chapter 04's best setting
QLORA = dict(steps=200, batch=8, seq_len=256, lr=1e-3, warmup=2, schedule='cosine', r=8, alpha=16,
             targets='all-linear', seed=0)


def runs() -> list[tuple]:
    "(label, family, kind, method or GGUF file type, settings) of every row, in the order they run."
    rows = [('float32', 'float', 'float', None, {})]
    for bits in (4, 3):
        rows += [(f'RTN INT{bits} g64', 'RTN', 'quantize', 'rtn', dict(bits=bits, symmetric=False, **G64)),
                 (f'GPTQ INT{bits} g64', 'GPTQ', 'quantize', 'gptq', dict(bits=bits, **G64, **GPTQ_BEST)),
                 (f'AWQ INT{bits} g64', 'AWQ', 'quantize', 'awq', dict(bits=bits, **G64)),
                 (f'AWQ then GPTQ INT{bits} g64', 'AWQ+GPTQ', 'quantize', 'awq_gptq',
                  dict(bits=bits, **G64, **GPTQ_BEST)),
                 (f'HQQ INT{bits} g64', 'HQQ', 'quantize', 'hqq', dict(bits=bits, **G64)),
                 (f'rotation + GPTQ INT{bits} g64', 'rotation+GPTQ', 'quantize', 'gptq_rot',
                  dict(bits=bits, **G64, **GPTQ_BEST))]
    rows += [('NF4 block 64, double quant', 'NF4', 'quantize', 'nf4', dict(double_quant=True)),
             ('FP4 block 64, double quant', 'FP4', 'quantize', 'fp4', dict(double_quant=True)),
             ('MXFP4', 'MXFP4', 'quantize', 'mxfp4', {}),
             ('NVFP4', 'NVFP4', 'quantize', 'nvfp4', {}),
             ('LLM.int8() threshold 6', 'LLM.int8()', 'quantize', 'llm_int8', {}),
             ('SmoothQuant W8A8 alpha 0.5', 'SmoothQuant', 'quantize', 'smoothquant', {})]
    rows += [(f'GGUF {mix}', 'GGUF', 'gguf', mix, {}) for mix in ('Q4_0', 'Q4_K_M', 'Q5_K_M', 'Q6_K', 'Q8_0')]
    rows += [('QLoRA: NF4 + LoRA', 'QLoRA', 'qlora', 'nf4', dict(double_quant=True))]
    return rows


def file_bytes(path: Path) -> int:
    "Bytes of a file, or of every file in a folder."
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


@torch.no_grad()
def decode_speed(model, tokenizer, device, new_tokens: int, repeats: int = 3) -> dict:
    "Greedy tokens/s at batch 1 with the KV cache: median of `repeats` after one warm-up."
    prompt = eval_tokens(tokenizer, 32)[None].to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.eos_token_id)
    model.generate(prompt, **kwargs)
    times = []
    for _ in range(repeats):
        sync(device); start = time.perf_counter()
        model.generate(prompt, **kwargs)
        sync(device); times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return dict(decode_tokens_per_s=new_tokens / seconds, decode_seconds=seconds)


def gguf_bits(model, mix: str) -> float:
    "Bits per weight of the decoder blocks' linear weights in llama.cpp's file type `mix`."
    shapes = {gguf_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    types = gguf_mix(shapes, mix)
    linears = [n for n, s in shapes.items() if n.startswith('blk.') and len(s) == 2]
    return mix_bits(shapes, types, linears)


def build(run, float_model, tokenizer, calibration, train_batches, qlora: dict, device, folder: Path) -> tuple:
    "The row's model, its seconds, the file it keeps and extra fields."
    label, family, kind, method, settings = run
    if kind == 'float':
        from safetensors.torch import save_model
        path = folder / 'model.safetensors'; save_model(float_model, str(path))
        return float_model, 0.0, path, dict(bits_per_weight=32.0)
    if kind == 'gguf':
        host = copy.deepcopy(float_model).cpu()
        start = time.perf_counter(); path = write_gguf(host, folder / f'{method}.gguf', method)
        seconds = time.perf_counter() - start
        model, _ = load_model(path, device=device)
        return model, seconds, path, dict(bits_per_weight=gguf_bits(host, method), where='host CPU')
    work = copy.deepcopy(float_model)
    needs = method in ('gptq', 'awq', 'awq_gptq', 'gptq_rot', 'smoothquant')
    sync(device); start = time.perf_counter()
    quantize_model(work, method, calibration=calibration if needs else None, progress=False, **settings)
    sync(device); seconds = time.perf_counter() - start
    extra = dict(bits_per_weight=model_bits(work))
    path = folder / 'model.safetensors'; save_quantized(work, path)
    if kind == 'qlora':
        trained = with_adapters(work, qlora['targets'], r=qlora['r'], alpha=qlora['alpha'],
                                seed=qlora['seed'])
        sync(device); start = time.perf_counter()
        losses = train_lora(trained, train_batches, qlora['steps'], lr=qlora['lr'], warmup=qlora['warmup'],
                            schedule=qlora['schedule'], progress=False)
        sync(device); extra |= dict(train_seconds=time.perf_counter() - start, nf4_seconds=seconds,
                                    first_loss=losses[0], last_loss=losses[-1], qlora=qlora)
        seconds += extra['train_seconds']
        path = save_adapters(trained, folder / 'adapters').parent
        work = trained.eval()
    return work, seconds, path, extra


def run_row(run, float_model, tokenizer, calibration, train_batches, qlora: dict, tokens, budget, device, meta,
            new_tokens: int, decode: bool = True) -> dict:
    "Build one row's model, measure it; its row."
    label, family, kind, method, settings = run
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        model, seconds, path, extra = build(run, float_model, tokenizer, calibration, train_batches, qlora,
                                            device, Path(folder))
        size = file_bytes(path)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None
    start = time.perf_counter()
    kl = kl_to_reference(model, float_model, tokens, context=budget.context, progress=False)
    eval_seconds = time.perf_counter() - start
    speed = decode_speed(model, tokenizer, device, new_tokens) if kind != 'gguf' and decode else {}
    row = dict(label=label, family=family, kind=kind, method=method, settings=settings,
               bits=settings.get('bits'), perplexity=kl['perplexity'], kl=kl['kl'], same_top=kl['same_top'],
               float_perplexity=kl['reference_perplexity'], eval_tokens=kl['tokens'], **extra,
               file_bytes=size, quantize_seconds=seconds, peak_gib=peak, eval_seconds=eval_seconds, **speed,
               commit=meta['commit'], dirty=meta['dirty'], recorded=meta['recorded'])
    del model
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', default=None, help='labels of the rows to run (default: all)')
    parser.add_argument('--out', default=None, help=f'default: {DEFAULT_OUT}; with --quick, the temporary folder')
    parser.add_argument('--new-tokens', type=int, default=128, help='tokens generated per decode measurement')
    parser.add_argument('--no-decode', action='store_true',
                        help='skip the decode timing (for rows whose layer class another row already times)')
    parser.add_argument('--quick', action='store_true', help='two blocks, tiny data: shows the script works')
    args = parser.parse_args(argv)
    out = Path(args.out or (Path(tempfile.gettempdir()) / 'guide_gpu.quick.json' if args.quick else DEFAULT_OUT))
    device = default_device()
    meta = run_metadata(device)
    budget = Budget('quick', 4, 64, 512, 128) if args.quick else get_budget('full')
    qlora = dict(QLORA, steps=2, batch=1, seq_len=32) if args.quick else QLORA
    chosen = [r for r in runs() if args.only is None or r[0] in args.only]
    if args.only and len(chosen) != len(args.only):
        known = [r[0] for r in runs()]
        raise SystemExit(f"unknown labels {sorted(set(args.only) - set(known))}; known: {known}")
    header = dict(meta, budget=str(budget), budget_name=budget.name, quick=args.quick,
                  matmul='float32 (TF32 off)', eval_text=EVALUATION_NOVEL, train_texts=list(CALIBRATION_NOVELS),
                  calibration=f'{budget.calib_samples} x {budget.calib_seq_len} tokens of the other five novels, seed 0',
                  decode=f'greedy generate, batch 1, {args.new_tokens} new tokens after 32, KV cache, eager, '
                         'median of 3 after a warm-up; the layers dequantize per call (NF4/FP4: fused Triton, else torch)',
                  model_blocks=2 if args.quick else 'all')
    previous = json.loads(out.read_text()) if out.exists() else {}
    same = all(previous.get(k) == header[k] for k in ('device', 'budget', 'quick'))
    result = {**(previous if same else {}), **header}
    rows = {r['label']: r for r in result.get('rows', [])}

    model, tokenizer = load_model(device=device)
    if args.quick:
        model.model.layers = model.model.layers[:2]; model.config.num_hidden_layers = 2
    calibration = calibration_samples(tokenizer, budget.calib_samples, budget.calib_seq_len, seed=0).to(device)
    train_batches = calibration_samples(tokenizer, qlora['steps'] * qlora['batch'], qlora['seq_len'], seed=0)
    train_batches = train_batches.view(qlora['steps'], qlora['batch'], qlora['seq_len']).to(device)
    tokens = eval_tokens(tokenizer, budget.eval_tokens)
    for run in chosen:
        row = run_row(run, model, tokenizer, calibration, train_batches, qlora, tokens, budget, device, meta,
                      args.new_tokens, decode=not args.no_decode)
        rows[row['label']] = row
        speed = f"{row['decode_tokens_per_s']:6.1f} tok/s" if 'decode_tokens_per_s' in row else ''
        print(f"{row['label']:32s} {row['bits_per_weight']:6.3f} bits  ppl {row['perplexity']:10.3f}  "
              f"KL {row['kl']:.4f}  {row['file_bytes'] / 1e6:7.1f} MB  {row['quantize_seconds']:6.1f} s  "
              f"{speed}", flush=True)
        result['rows'] = list(rows.values())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
