"""Tiny, randomly initialised decoder-only models of several architectures, built from configs in code.

Nothing is downloaded: each model comes from a transformers config and a seeded initialisation, so two builds
with the same seed are identical. Every linear inside a decoder block has `in_features` a multiple of 64
(hidden 128, intermediate 256, 4 heads of 32), so any group size in (32, 64) divides every layer.

`ARCHS` maps a short name to what a test needs to know about the architecture *without asking the library*:
where the decoder blocks live, and whether SmoothQuant can fold its factors into a norm directly before
every group of linears that shares an input (see `ArchInfo.smoothable`).
"""
from __future__ import annotations
from dataclasses import dataclass
import torch, transformers
from torch import nn

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB, MAX_POS = 128, 256, 4, 2, 32, 256, 128

@dataclass(frozen=True)
class ArchInfo:
    "What the tests know about one tiny architecture."
    name: str
    blocks: str              # dotted path of the nn.ModuleList of decoder blocks
    smoothable: bool         # True: every group of linears sharing an input has a norm directly before it
    why: str                 # the module structure behind `smoothable` (norm -> linears), for messages and the report
    norm_fed: tuple = ()     # (norm, (linears reading its output, ...)) inside one block: what smoothing must touch
    missing: str = ''        # when not smoothable: a word the library's ValueError should name

def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                max_position_embeddings=MAX_POS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                initializer_range=0.1, attn_implementation='eager', **kw)

def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_common(
        num_hidden_layers=2, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=False)))

def _qwen2():  # q, k, v carry biases
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_common(
        num_hidden_layers=2, num_key_value_heads=KV_HEADS, tie_word_embeddings=True)))

def _mistral():  # every layer uses a sliding window, shorter than the calibration sequences
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_common(
        num_hidden_layers=2, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, sliding_window=16)))

def _gemma3():  # text-only; sliding (window 8, rope base 1e4) and full (rope base 1e6) layers alternate
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**_common(
        num_hidden_layers=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=8, layer_types=['sliding_attention', 'full_attention'] * 2)))

def _phi3():  # fused qkv_proj and gate_up_proj
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**_common(
        num_hidden_layers=2, num_key_value_heads=KV_HEADS, original_max_position_embeddings=MAX_POS)))

def _opt(pre_norm=True):
    cfg = _common(num_hidden_layers=2, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, do_layer_norm_before=pre_norm,
                  init_std=0.1, enable_bias=True)
    del cfg['intermediate_size'], cfg['initializer_range']
    return transformers.OPTForCausalLM(transformers.OPTConfig(**cfg))

def _gpt_neox():  # fused query_key_value; parallel residual: two norms read the same residual stream
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_common(
        num_hidden_layers=2, use_parallel_residual=True, rotary_pct=0.25, tie_word_embeddings=False)))

BUILDERS = {'llama': _llama, 'qwen2': _qwen2, 'mistral': _mistral, 'gemma3': _gemma3, 'phi3': _phi3,
            'opt': _opt, 'opt_postln': lambda: _opt(pre_norm=False), 'gpt_neox': _gpt_neox}

_QKV = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj')
_LLAMA = (('input_layernorm', _QKV), ('post_attention_layernorm', ('mlp.gate_proj', 'mlp.up_proj')))
ARCHS = {a.name: a for a in [
    ArchInfo('llama', 'model.layers', True, 'input_layernorm -> q,k,v; post_attention_layernorm -> gate,up', _LLAMA),
    ArchInfo('qwen2', 'model.layers', True, 'input_layernorm -> q,k,v (with biases); post_attention_layernorm -> gate,up', _LLAMA),
    ArchInfo('mistral', 'model.layers', True, 'input_layernorm -> q,k,v; post_attention_layernorm -> gate,up', _LLAMA),
    ArchInfo('gemma3', 'model.layers', True,
             'input_layernorm -> q,k,v; pre_feedforward_layernorm -> gate,up (post_attention_layernorm normalises '
             "the attention output, not the MLP input); Gemma's RMSNorm scales by (1 + weight)",
             (('input_layernorm', _QKV), ('pre_feedforward_layernorm', ('mlp.gate_proj', 'mlp.up_proj')))),
    ArchInfo('phi3', 'model.layers', True, 'input_layernorm -> qkv_proj; post_attention_layernorm -> gate_up_proj',
             (('input_layernorm', ('self_attn.qkv_proj',)), ('post_attention_layernorm', ('mlp.gate_up_proj',)))),
    ArchInfo('opt', 'model.decoder.layers', True,
             'self_attn_layer_norm (LayerNorm, with bias) -> q,k,v; final_layer_norm (with bias) -> fc1',
             (('self_attn_layer_norm', _QKV), ('final_layer_norm', ('fc1',)))),
    ArchInfo('opt_postln', 'model.decoder.layers', False,
             'post-LN OPT (do_layer_norm_before=False, like opt-350m): q,k,v read the block input (the previous '
             "block's final_layer_norm output, or the embeddings) with no norm inside the block; fc1 reads "
             'self_attn_layer_norm through a reshape(-1, hidden), a view that hooks on tensor identity do not follow',
             missing='norm'),
    ArchInfo('gpt_neox', 'gpt_neox.layers', True,
             'parallel residual: input_layernorm -> query_key_value and post_attention_layernorm -> dense_h_to_4h, '
             'both LayerNorms (with bias) of the same residual stream',
             (('input_layernorm', ('attention.query_key_value',)), ('post_attention_layernorm', ('mlp.dense_h_to_4h',)))),
]}

@torch.no_grad()
def _perturb(model: nn.Module, generator: torch.Generator):
    "Give norms non-trivial weights and biases (transformers initialises them to 1/0), and linears non-zero biases."
    for module in model.modules():
        norm = 'norm' in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            if (norm and p.ndim == 1) or (isinstance(module, nn.Linear) and pname == 'bias'):
                p.add_(0.2 * torch.randn(p.shape, generator=generator))

def build(arch: str, seed: int = 0) -> nn.Module:
    "A tiny float32 model of `arch`, in eval mode, identical for a given seed; eager attention."
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    _perturb(model, torch.Generator().manual_seed(seed + 1))
    assert model.config._attn_implementation == 'eager'
    model.generation_config.pad_token_id = 0
    return model.float().eval()

def calibration(n_samples: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    "Random token ids, (n_samples, seq_len), from a seeded generator."
    return torch.randint(3, VOCAB, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))

def blocks_of(model: nn.Module, arch: str) -> nn.ModuleList:
    "The decoder blocks, from the known path (an oracle independent of the library's discovery)."
    return model.get_submodule(ARCHS[arch].blocks)

def block_linears(model: nn.Module, arch: str, cls=nn.Linear) -> list[str]:
    "Full names of the modules of class `cls` inside the decoder blocks."
    prefix = ARCHS[arch].blocks
    return [f'{prefix}.{n}' for n, m in blocks_of(model, arch).named_modules() if isinstance(m, cls)]
