"""QLoRA on the GPU (chapter 08): our NF4 + double-quantization base (chapter 07's fused Triton dequantization
and its 4-bit autograd function) with our `LoRALinear`, against peft + bitsandbytes, in five parts:

- `correctness`: on the device first, the Triton dequantization against bitsandbytes' `dequantize_4bit` on the
  same codes (bit for bit, or within one bfloat16 rounding: recorded), plain and double-quantized scales, on
  Llama-3-8B's shapes; our QLoRA layer's output and the gradients of A, B and the input against peft's LoRA over
  bitsandbytes' `Linear4bit` holding the same codes; and what each keeps for the backward pass;
- `memory_course`: `training_memory` (the library's formula) against `torch.cuda.max_memory_allocated` for the
  course model (SmolLM2-135M, bfloat16) under full fine-tuning, 16-bit LoRA and QLoRA;
- `llama8b`: a Llama-3-8B-shaped model with random weights (built in bfloat16 on the card, quantized layer by
  layer there): 16-bit LoRA (peft; ours), QLoRA (peft + bitsandbytes; ours), side by side in one run: median step
  time, peak memory, the formula; where a QLoRA step's time goes (dequantization against the matrix products,
  timed per shape); full fine-tuning of 8B does not fit one card: formula only;
- `llama65b`: QLoRA (ours; peft + bitsandbytes beside it) on 1, 2, 4 and 8 decoder layers of LLaMA-65B's shape
  (hidden 8192, MLP 22016, 64 heads without grouped-query attention, vocabulary 32000), random weights: memory
  loaded and peak, fitted by a line in the number of layers and extrapolated to 80, beside the formula;
- `task`: chapter 08's fine-tune at the full budget (200 steps of 8 x 256 tokens of the calibration novels,
  perplexity on the first 16,384 tokens of Pride and Prejudice every 20 steps), with the notebook's own helpers
  (`add_lora`, `prepare_for_kbit_training`, `train_lora`) and settings, for: float, NF4 + DQ and GPTQ int4 without
  tuning, full fine-tuning, 16-bit LoRA, QLoRA (all linears; q and v only), QLoRA on the GPTQ int4 base.

Settings of the memory and speed parts, as the QLoRA reference measurements: LoRA r=16 (alpha 32, no dropout,
float32 adapters) on every block linear, sequence 512, batch 1, gradient checkpointing (non-reentrant, input
gradients enabled), torch's AdamW; the weights that stay 16-bit (embeddings, norms, head) stay bfloat16, as the
formula with nbytes=2 counts them. Compute in bfloat16.

    python bench/qlora_gpu.py [--only PART ...] [--out PATH] [--quick]

On CUDA it writes bench/results/qlora_gpu.json (or --out); when that file exists, the parts run now replace
those parts in it and the others are kept, so the parts can run in separate calls. `--merge A.json B.json ...`
joins files written by separate calls. `--quick` runs every part at toy sizes (tiny random Llamas; the course
model for a few steps) to show the script works; on a CPU it measures no memory, and it writes only to the
temporary folder (or --out).

Expected on one H100 (80 GB), each part alone: correctness ~1 min, < 10 GiB; memory_course ~1 min, < 6 GiB;
llama8b ~3 min, peak ~17 GiB (a bfloat16 copy of the 8B model, 16 GiB, is built for every row);
llama65b ~2 min, peak ~17 GiB (8 layers built in bfloat16 before quantizing); task ~6 min, ~49 GiB (measured on an H100: 370 s).
"""
from __future__ import annotations
import argparse, contextlib, copy, gc, json, math, os, statistics, sys, tempfile, time
from pathlib import Path
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from quantcourse.core import (load_model, calibration_samples, eval_tokens, perplexity, replace_linears,
                              EVALUATION_NOVEL, CALIBRATION_NOVELS)
from quantcourse.scales import Arch, ARCHS
from quantcourse.nf4 import (NF4Linear, Weight4bit, FAST_PATHS, dynamic_code, same_bits, linear_4bit,
                             triton_dequantize_4bit)
from quantcourse.qlora import (LoRALinear, add_lora, block_linears, lora_layers, prepare_for_kbit_training,
                               train_lora, training_memory, trainable_parameters,
                               track_training, with_adapters)
from quantcourse.api import quantize_model
from benchmeta import run_metadata, sync

try:
    import triton
except ImportError:  # CPU images have no triton
    triton = None

PARTS = ('correctness', 'memory_course', 'llama8b', 'llama65b', 'task')
DEFAULT_OUT = Path(__file__).resolve().parent / 'results' / 'qlora_gpu.json'
GiB = 2 ** 30
R, ALPHA, SEQ, BATCH = 16, 32, 512, 1          # the reference settings of the memory and speed parts
DTYPE = torch.bfloat16
LLAMA_65B = Arch('LLaMA-65B', layers=80, hidden=8192, intermediate=22016, heads=64, kv_heads=64, vocab=32000,
                 tied=False)
TINY = Arch('tiny Llama', layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=256, tied=False)


# ---------------------------------------------------------------- helpers
def log(*args): print(*args, flush=True)


def free(device):
    "Collect garbage and give cached blocks back, so the next measurement starts from what is alive."
    gc.collect()
    if device == 'cuda': torch.cuda.synchronize(); torch.cuda.empty_cache()


def allocated(device) -> int | None:
    return torch.cuda.memory_allocated() if device == 'cuda' else None


def config_for(arch: Arch, layers: int | None = None):
    "A transformers LlamaConfig of `arch`'s shape (random weights: nothing is downloaded)."
    import transformers
    return transformers.LlamaConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=layers or arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=arch.tied, attn_implementation='sdpa', use_cache=False)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype(); torch.set_default_dtype(dtype)
    try: yield
    finally: torch.set_default_dtype(old)


def random_llama(arch: Arch, device, layers: int | None = None, seed: int = 0):
    "A Llama of `arch`'s shape with random weights, created directly on `device` in bfloat16."
    import transformers
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(DTYPE):
        model = transformers.LlamaForCausalLM(config_for(arch, layers))
    return model.to(DTYPE).eval()


def to_nf4(model, device):
    "Our NF4 + double quantization (blocks of 64, bfloat16 compute) on every block linear, one layer at a time."
    replace_linears(model, lambda name, linear: NF4Linear.from_linear(linear, 64, 'nf4', True, DTYPE),
                    block_linears(model))
    free(device)
    return model


def bnb_linear(linear, device):
    "bitsandbytes' `Linear4bit` (NF4, double quantization, bfloat16 compute) holding `linear`'s weight."
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=DTYPE, compress_statistics=True, quant_type='nf4', device='meta')
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type='nf4', module=layer)._quantize(device)
    if linear.bias is not None: layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def to_bnb(model, device):
    "bitsandbytes' NF4 + DQ on every block linear, one layer at a time."
    replace_linears(model, lambda name, linear: bnb_linear(linear, device), block_linears(model))
    free(device)
    return model


def checkpointing(model):
    "peft's preparation without the float32 cast: frozen, non-reentrant gradient checkpointing, input grads."
    model.requires_grad_(False)
    kwargs = dict(use_reentrant=False)
    if hasattr(model, 'activation_checkpointing_enable'): model.activation_checkpointing_enable(kwargs)
    else: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    return model


def peft_lora(model, targets='all-linear', r=R, alpha=ALPHA):
    import peft
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type='CAUSAL_LM')
    return peft.get_peft_model(model, config)


def step_times(model, device, steps: int, warmup: int, vocab: int, seq=SEQ, batch=BATCH, lr=1e-4):
    """Train `model`'s trainable parameters with AdamW on random tokens: seconds of each timed step (after
    `warmup`), the losses, the memory allocated before the first step and the peak over all steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokens = torch.randint(0, vocab, (warmup + steps, batch, seq), generator=torch.Generator().manual_seed(0))
    free(device)
    loaded = allocated(device)
    if device == 'cuda': torch.cuda.reset_peak_memory_stats()
    model.train()
    seconds, losses = [], []
    for i in range(warmup + steps):
        ids = tokens[i].to(device)
        sync(device); start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
        sync(device); elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if not math.isfinite(losses[-1]): raise FloatingPointError(f"loss {losses[-1]} at step {i + 1}")
        if i >= warmup: seconds.append(elapsed)
    peak = torch.cuda.max_memory_allocated() if device == 'cuda' else None
    model.eval()
    del optimizer; free(device)
    return dict(step_s_median=statistics.median(seconds), step_s=seconds, losses=losses, loaded_bytes=loaded,
                peak_bytes=peak, loaded_gib=None if loaded is None else loaded / GiB,
                peak_gib=None if peak is None else peak / GiB, trainable=trainable_parameters(model))


def formula(arch, setup, **kw) -> dict:
    "The library's estimate, in bytes and GiB."
    parts = training_memory(arch, setup, r=R, seq_len=SEQ, batch=BATCH, gradient_checkpointing=True, nbytes=2, **kw)
    return dict(bytes=parts, total_gib=parts['total'] / GiB)


def compare_tensors(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    "Bitwise equal? If not: the largest absolute difference, relative to the reference's largest value."
    if same_bits(ours, reference): return dict(bitwise=True, max_abs_diff=0.0, relative=0.0)
    diff = (ours.float() - reference.float()).abs().max().item()
    return dict(bitwise=False, max_abs_diff=diff, relative=diff / max(reference.float().abs().max().item(), 1e-30))


def within_one_rounding(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    "Every value within one bfloat16 step (8 significant bits) of the reference's."
    step = reference.float().abs() * 2.0 ** -7 + 1e-30
    return bool(((ours.float() - reference.float()).abs() <= step).all())


def saved_bytes(fn):
    "Bytes of the tensors autograd saves for backward while `fn()` runs, and its result."
    saved = []
    def pack(t): saved.append(t.numel() * t.element_size()); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): out = fn()
    return sum(saved), out


def weight_from_bnb(layer) -> Weight4bit:
    "Our `Weight4bit` sharing the codes and (double-quantized) scales of a bitsandbytes `Linear4bit`."
    state = layer.weight.quant_state
    nested = state.state2 is not None
    return Weight4bit(layer.weight.data.view(-1), state.absmax, tuple(state.shape), state.dtype, state.blocksize,
                      state.quant_type, state.state2.absmax if nested else None,
                      state.offset if nested else None)


# ---------------------------------------------------------------- part: correctness
def part_correctness(device, quick) -> dict:
    shapes = ({'128x256': (128, 256), '96x200 (ragged)': (96, 200)} if quick else
              {'4096x4096 (q_proj)': (4096, 4096), '14336x4096 (gate/up_proj)': (14336, 4096),
               '4096x14336 (down_proj)': (4096, 14336), '1536x576 (course MLP, ragged)': (1536, 576)})
    generator = torch.Generator().manual_seed(0)
    dequant = []
    for label, shape in shapes.items():
        weight = (torch.randn(shape, generator=generator) * 0.02).to(DTYPE).to(device)
        for double_quant in (False, True):
            packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type='nf4', compress_statistics=double_quant)
            reference = bnbF.dequantize_4bit(packed, state).view(shape)
            ours = Weight4bit(packed.view(-1), state.absmax, shape, DTYPE, 64, 'nf4',
                              state.state2.absmax if double_quant else None, state.offset if double_quant else None)
            paths = {'torch ops (Weight4bit.dequantize)': lambda: ours.dequantize(DTYPE)}
            if triton is not None and device == 'cuda':
                paths['Triton fused (triton_dequantize_4bit)'] = lambda: triton_dequantize_4bit(ours, DTYPE)
            for name, fn in paths.items():
                out = fn()
                row = dict(shape=label, double_quant=double_quant, method=name, reference='bitsandbytes dequantize_4bit',
                           **compare_tensors(out, reference), within_one_rounding=within_one_rounding(out, reference))
                dequant.append(row); log(json.dumps(row))
                if not row['within_one_rounding'] and device == 'cuda':
                    raise SystemExit(f"{name} disagrees with bitsandbytes beyond one rounding: {row}")
    layer_checks = layer_parity(device, quick)
    return dict(dequantize=dequant, layer=layer_checks,
                fast_path=device == 'cuda' and FAST_PATHS.get('cuda') is linear_4bit,
                triton_kernel=triton is not None and device == 'cuda')


def layer_parity(device, quick) -> dict:
    "Our LoRALinear over NF4Linear against peft's LoRA over bnb Linear4bit, same codes, same A and B."
    import peft
    in_f, out_f, tokens = (256, 128, 64) if quick else (4096, 4096, 1024)
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=DTYPE)
    with torch.no_grad(): linear.weight.copy_(torch.randn(out_f, in_f, generator=generator) * 0.02)
    holder = torch.nn.Module(); holder.proj = bnb_linear(linear.to(device), device)
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=['proj']))
    their_layer = theirs.base_model.model.proj
    base = NF4Linear.from_weight(weight_from_bnb(holder.proj), compute_dtype=DTYPE)
    ours = LoRALinear(base, r=R, alpha=ALPHA, dtype=torch.float32)
    with torch.no_grad():
        ours.lora_A.weight.copy_(their_layer.lora_A['default'].weight)
        ours.lora_B.weight.copy_(torch.randn(out_f, R, generator=generator).to(device) * 0.02)  # B != 0
        their_layer.lora_B['default'].weight.copy_(ours.lora_B.weight)
    x = torch.randn(tokens, in_f, generator=generator).to(DTYPE).to(device)
    grad_y = torch.randn(tokens, out_f, generator=generator).to(DTYPE).to(device)
    theirs.train(); ours.train()
    results = {}
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    kept_theirs, y_theirs = saved_bytes(lambda: theirs.base_model.model.proj(x_theirs))
    kept_ours, y_ours = saved_bytes(lambda: ours(x_ours))
    y_theirs.backward(grad_y); y_ours.backward(grad_y)
    pairs = {'output': (y_ours, y_theirs), 'grad A': (ours.lora_A.weight.grad, their_layer.lora_A['default'].weight.grad),
             'grad B': (ours.lora_B.weight.grad, their_layer.lora_B['default'].weight.grad),
             'grad x': (x_ours.grad, x_theirs.grad)}
    for name, (a, b) in pairs.items():
        results[name] = compare_tensors(a, b)
        log(f"layer parity, {name}: {results[name]}")
    tolerance = 1e-2  # bfloat16 compute: a few roundings of 2**-8
    bad = {k: v for k, v in results.items() if v['relative'] > tolerance}
    if bad and device == 'cuda': raise SystemExit(f"our QLoRA layer disagrees with peft + bitsandbytes: {bad}")
    base_bytes = sum(t.numel() * t.element_size() for t in base.weight().tensors().values())
    return dict(shape=f"{out_f}x{in_f}", tokens=tokens, r=R, alpha=ALPHA, compute_dtype='bfloat16',
                adapters='float32', tolerance_relative=tolerance, checks=results,
                saved_for_backward_bytes={'ours': kept_ours, 'peft + bitsandbytes': kept_theirs,
                                          'bfloat16 weight (for scale)': out_f * in_f * 2,
                                          'our 4-bit weight (codes and scales)': base_bytes})


# ---------------------------------------------------------------- part: memory of the course model
def part_memory_course(device, quick) -> dict:
    model, _ = load_model(device=device)
    model = model.to(DTYPE)
    arch = ARCHS['SmolLM2-135M']
    vocab = model.config.vocab_size
    rows = []
    for setup in ('full', 'lora', 'qlora'):
        trained = copy.deepcopy(model)
        if setup == 'qlora': to_nf4(trained, device)
        if setup == 'full': checkpointing(trained).requires_grad_(True)
        else: add_lora(checkpointing(trained), r=R, alpha=ALPHA, dtype=torch.float32)
        steps, warmup = (1, 0) if quick else (5, 2)
        measured = step_times(trained, device, steps, warmup, vocab, seq=16 if quick else SEQ)
        row = dict(model='SmolLM2-135M', setup=setup, **measured, formula=formula(arch, setup))
        rows.append(row); log(summary(row))
        del trained; free(device)
    return dict(rows=rows, note='full fine-tuning: every parameter bfloat16, AdamW moments in bfloat16 (pure 16-bit,'
                                ' as the formula); LoRA/QLoRA: float32 adapters on every block linear')


def summary(row) -> str:
    peak = 'n/a' if row.get('peak_gib') is None else f"{row['peak_gib']:.2f} GiB"
    return (f"{row['model']:>14} {row['setup']:<6} {row.get('library', 'ours'):<20} peak {peak:>10}  "
            f"formula {row['formula']['total_gib']:.2f} GiB  step {row['step_s_median'] * 1000:.0f} ms")


# ---------------------------------------------------------------- part: Llama-3-8B shape
def part_llama8b(device, quick) -> dict:
    arch = TINY if quick else ARCHS['Llama-3 8B']
    steps, warmup = (2, 1) if quick else (10, 3)
    rows = []
    for setup, library in [('lora', 'peft'), ('lora', 'ours'), ('qlora', 'peft + bitsandbytes'), ('qlora', 'ours')]:
        free(device)
        model = random_llama(arch, device)
        if setup == 'qlora': (to_nf4 if library == 'ours' else to_bnb)(model, device)
        checkpointing(model)
        model = peft_lora(model) if library != 'ours' else add_lora(model, r=R, alpha=ALPHA, dtype=torch.float32)
        measured = step_times(model, device, steps, warmup, arch.vocab, seq=64 if quick else SEQ)
        row = dict(model=arch.name, setup=setup, library=library, **measured, formula=formula(arch, setup))
        rows.append(row); log(summary(row))
        del model; free(device)
    return dict(rows=rows, steps=steps, warmup=warmup,
                full_fine_tuning=dict(formula=formula(arch, 'full'),
                                      note='not run: weights, gradients and two AdamW moments of 8B parameters in '
                                           '16 bits exceed one card'),
                time_split=time_split(arch, device, quick))


def time_split(arch: Arch, device, quick) -> dict | None:
    """Where a QLoRA step's time goes, estimated per block linear: each is dequantized three times a step
    (forward, recomputation, backward) and multiplied three times (forward, recomputation, input gradient)."""
    if device != 'cuda' or triton is None: return None
    tokens = SEQ * BATCH
    rows, total_dequant, total_bnb, total_matmul = [], 0.0, 0.0, 0.0
    generator = torch.Generator().manual_seed(2)
    for kind, out_f, in_f in arch.linears():
        weight = (torch.randn(out_f, in_f, generator=generator) * 0.02).to(DTYPE).to(device)
        packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type='nf4', compress_statistics=True)
        ours = Weight4bit(packed.view(-1), state.absmax, (out_f, in_f), DTYPE, 64, 'nf4', state.state2.absmax,
                          state.offset)
        x = torch.randn(tokens, in_f, device=device, dtype=DTYPE)
        g = torch.randn(tokens, out_f, device=device, dtype=DTYPE)
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
        dequant_ms = bench(lambda: triton_dequantize_4bit(ours, DTYPE))
        bnb_ms = bench(lambda: bnbF.dequantize_4bit(packed, state))
        forward_ms = bench(lambda: F.linear(x, weight))
        backward_ms = bench(lambda: g @ weight)
        rows.append(dict(kind=kind, shape=f"{out_f}x{in_f}", dequant_triton_ms=dequant_ms, dequant_bnb_ms=bnb_ms,
                         matmul_forward_ms=forward_ms, matmul_input_grad_ms=backward_ms))
        total_dequant += 3 * dequant_ms; total_bnb += 3 * bnb_ms; total_matmul += 2 * forward_ms + backward_ms
        del weight, packed, state, ours
    layers = arch.layers
    return dict(rows=rows, tokens=tokens,
                per_step_ms=dict(dequant_triton=layers * total_dequant, dequant_bnb=layers * total_bnb,
                                 base_matmuls=layers * total_matmul),
                note='estimated from per-shape timings (triton.testing.do_bench, median): 3 dequantizations and 3 '
                     'matrix products (2 forward, 1 input gradient) per block linear per step; adapters, attention, '
                     'norms, the head and the optimizer are the rest of the measured step')


# ---------------------------------------------------------------- part: LLaMA-65B-shaped layers
def part_llama65b(device, quick) -> dict:
    arch = TINY if quick else LLAMA_65B
    layer_counts = (1, 2) if quick else (1, 2, 4, 8)
    rows = []
    for library in ('ours', 'peft + bitsandbytes'):
        for n in layer_counts:
            free(device)
            model = random_llama(arch, device, layers=n)
            (to_nf4 if library == 'ours' else to_bnb)(model, device)
            checkpointing(model)
            model = add_lora(model, r=R, alpha=ALPHA, dtype=torch.float32) if library == 'ours' else peft_lora(model)
            measured = step_times(model, device, 2, 1, arch.vocab, seq=64 if quick else SEQ)
            shaped = Arch(arch.name, n, arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.vocab, arch.tied)
            row = dict(model=f"{arch.name} x {n} layers", layers=n, setup='qlora', library=library, **measured,
                       formula=formula(shaped, 'qlora'))
            rows.append(row); log(summary(row))
            del model; free(device)
    fits = {}
    if device == 'cuda':
        for library in ('ours', 'peft + bitsandbytes'):
            mine = [r for r in rows if r['library'] == library]
            fits[library] = {key: line_fit([r['layers'] for r in mine], [r[key] / GiB for r in mine], arch.layers)
                             for key in ('loaded_bytes', 'peak_bytes')}
    return dict(rows=rows, extrapolated_to=arch.layers, fits=fits,
                formula_full_model=formula(arch, 'qlora'),
                note='a line a + b * layers fitted (least squares) to the measured GiB, evaluated at 80 layers')


def line_fit(xs, ys, at) -> dict:
    "Least-squares line through (xs, ys): intercept, slope per layer, and its value at `at`."
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    return dict(intercept_gib=intercept, per_layer_gib=slope, at_gib=intercept + slope * at, at_layers=at)


# ---------------------------------------------------------------- part: the task at full size
def part_task(device, quick) -> dict:
    """Chapter 08's fine-tune (same helpers, settings and seed as the notebook), at the full budget."""
    steps, batch, seq_len, eval_every, n_eval = (2, 1, 32, 1, 256) if quick else (200, 8, 256, 20, 16384)
    calib_samples, calib_seq_len = (2, 64) if quick else (128, 2048)   # the GPTQ base: budget 'full'
    model, tokenizer = load_model(device=device)                       # float32, as in the notebook
    train_batches = calibration_samples(tokenizer, steps * batch, seq_len, seed=0).view(steps, batch, seq_len)
    train_batches = train_batches.to(device)
    held_out = eval_tokens(tokenizer, n_eval)
    measure = lambda m: perplexity(m, held_out, context=256, progress=False)
    nf4_model = copy.deepcopy(model)
    replace_linears(nf4_model, lambda name, linear: NF4Linear.from_linear(linear, 64, 'nf4', True),
                    block_linears(nf4_model))
    gptq_calibration = calibration_samples(tokenizer, calib_samples, calib_seq_len, seed=0)
    gptq_model = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_model(gptq_model, 'gptq', calibration=gptq_calibration, bits=4, group_size=64, progress=False)
    gptq_seconds = time.perf_counter() - start
    curves = {'float': {0: measure(model)}, 'NF4 + DQ': {0: measure(nf4_model)}, 'GPTQ int4': {0: measure(gptq_model)}}
    track = lambda trained, **kw: track_training(trained, train_batches, steps, measure, every=eval_every,
                                                 progress=False, **kw)
    torch.manual_seed(0)
    runs = {'full fine-tuning': track(copy.deepcopy(model).requires_grad_(True), lr=2e-5)}
    log(f"full fine-tuning: {runs['full fine-tuning']['curve']}")
    for name, base, targets in [('LoRA (float32 base)', model, 'all-linear'),
                                ('QLoRA, all linears', nf4_model, 'all-linear'),
                                ('QLoRA, q and v only', nf4_model, ['q_proj', 'v_proj']),
                                ('QLoRA on GPTQ, all linears', gptq_model, 'all-linear')]:
        runs[name] = track(with_adapters(base, targets))
        log(f"{name}: {runs[name]['curve']} ({runs[name]['seconds']:.1f} s)")
        free(device)
    curves.update({name: run['curve'] for name, run in runs.items()})
    seconds = {name: run['seconds'] for name, run in runs.items()}
    losses = {name: run['losses'] for name, run in runs.items()}
    return dict(steps=steps, batch=batch, seq_len=seq_len, eval_every=eval_every, eval_tokens=len(held_out),
                eval_context=256, eval_text=EVALUATION_NOVEL, train_texts=list(CALIBRATION_NOVELS),
                lr_adapters=1e-3, lr_full=2e-5, warmup=2, schedule='cosine', r=8, alpha=16, seed=0,
                weights='float32', gradient_checkpointing=False,
                gptq=dict(bits=4, group_size=64, calibration=f"{calib_samples} x {calib_seq_len}", seconds=gptq_seconds),
                curves={k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
                train_seconds=seconds, losses=losses)


# ---------------------------------------------------------------- the run
RUNNERS = dict(correctness=part_correctness, memory_course=part_memory_course, llama8b=part_llama8b,
               llama65b=part_llama65b, task=part_task)


def run(parts, quick: bool) -> dict:
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    import peft, transformers
    versions = dict(bitsandbytes=bnb.__version__, peft=peft.__version__, transformers=transformers.__version__)
    result = {}
    for part in parts:
        log(f"== {part}")
        start = time.perf_counter()
        body = RUNNERS[part](device, quick)
        result[part] = dict(**run_metadata(device), **versions, quick=quick, seconds=time.perf_counter() - start,
                            **body)
        log(f"== {part}: {result[part]['seconds']:.0f} s")
        free(device)
    return result


def merge(paths, into: dict | None = None) -> dict:
    "The parts of several result files in one (later files win)."
    merged = into or dict(benchmark='qlora_gpu', parts={})
    for path in paths:
        merged['parts'].update(json.loads(Path(path).read_text())['parts'])
    return merged


def write(out: Path, parts: dict):
    data = merge([out]) if out.exists() else dict(benchmark='qlora_gpu', parts={})
    data['parts'].update(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + '\n')
    log(f"wrote {out} (parts: {sorted(data['parts'])})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', nargs='+', choices=PARTS, default=list(PARTS), help='the parts to run')
    parser.add_argument('--out', type=Path, default=None, help=f'JSON to write or update (default on CUDA: {DEFAULT_OUT})')
    parser.add_argument('--quick', action='store_true', help='toy sizes, to show the script works (CPU included)')
    parser.add_argument('--merge', nargs='+', type=Path, default=None, help='join these result files into --out and exit')
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None: parser.error('--merge needs --out')
        write(args.out, merge(args.merge)['parts']); return
    out = args.out or (Path(tempfile.gettempdir()) / 'qlora_gpu.quick.json' if args.quick else
                       DEFAULT_OUT if torch.cuda.is_available() else None)
    if out is None: parser.error('no CUDA here: use --quick (or --out to write the CPU run somewhere)')
    write(out, run(args.only, args.quick))


if __name__ == '__main__':
    main()
