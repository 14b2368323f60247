"""Post-training dynamic int8 quantization of linear layers, stored in the signed safetensors format.

A quantized PyTorch module holds packed weights that safetensors cannot store, and pickling them would
bypass the manifest and signature checks. So a quantized version stores, for every quantized linear
layer, its int8 weight and its scale as plain tensors (4x smaller than float32), and model.json says
`quantization: {method: int8_dynamic, weights: [...]}`. Loading rebuilds the float model from the
dequantized weights, applies `torch.ao.quantization.quantize_dynamic` and puts the stored int8 weights
back exactly, so what runs is bit for bit what was quantized. On a GPU (no int8 dynamic kernels there)
the dequantized float weights run instead.

`torch.ao.quantization` is deprecated in favour of torchao (torch 2.13 warns); it still ships and works
on CPU, and it is the one int8 path that needs no extra dependency. Swap here when it goes.
"""

from __future__ import annotations

import logging
import types
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

METHOD = "int8_dynamic"
SCALE = ".int8_scale"


# Attention projections an int8 encoder layer holds as quantized linear layers (nn.MultiheadAttention keeps
# them as raw tensors, which quantize_dynamic skips): the module's name on the attention -> the float weight it
# replaces, which is also the key its int8 weight is stored under.
ATTENTION = {"_q_in_proj": "in_proj_weight", "_q_out_proj": "out_proj.weight"}


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    """quantize_dynamic over the plain nn.Linear layers that share no weight (a tied GPT head stays float), and
    the attention projections of batch-first encoder layers."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    tied = tied_linear(model)
    names = {n: default_dynamic_qconfig for n, m in model.named_modules() if type(m) is nn.Linear and n not in tied}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        model = quantize_dynamic(model, names, dtype=torch.qint8)
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False  # the nested-tensor path reads float weights this model no longer has
        if isinstance(mod, nn.TransformerEncoderLayer):
            attn = mod.self_attn
            if attn.batch_first and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn:
                # This forward runs the layer with int8 projections around one SDPA call
                attn._q_in_proj = _qlinear(attn.in_proj_weight, attn.in_proj_bias)
                attn._q_out_proj = _qlinear(attn.out_proj.weight, attn.out_proj.bias)
                attn.in_proj_weight = attn.in_proj_bias = None  # no float copy left behind
                del attn.out_proj
                mod.forward = types.MethodType(_encoder_layer_forward, mod)
            else:
                # The layer's own forward: its fused fast path reads linear1.weight as a tensor, which a
                # quantized layer lacks; a (no-op) hook is one of the documented conditions that keep the
                # regular, quantizable path
                mod.register_forward_pre_hook(_no_op)
    return model


def _qlinear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A dynamic int8 linear layer of a float weight, quantized as quantize_dynamic quantizes nn.Linear."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear
    from torch.ao.quantization import default_dynamic_qconfig

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.qconfig = default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QLinear.from_float(linear)


def _no_op(module, args):
    return None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.Transformer's mask convention (bool: True = may not attend; float: added) as an additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: torch.Tensor, src_mask=None,
                           src_key_padding_mask=None, is_causal: bool = False) -> torch.Tensor:
    """nn.TransformerEncoderLayer's computation (eval: no dropout) with attention as one fused
    scaled_dot_product_attention call between int8 projections: the regular path's outputs up to int8 rounding
    (tested), and faster on CPU. Takes the same masks: key padding, an attention mask (L, S) or (N*heads, L, S),
    is_causal."""
    if layer.training:
        raise RuntimeError("an int8 model runs inference only; fine-tune its float source instead")
    attn = layer.self_attn
    b, n, d = src.shape
    h = attn.num_heads
    mask = _additive(src_key_padding_mask, src.dtype)
    mask = None if mask is None else mask[:, None, None, :]
    extra = _additive(src_mask, src.dtype)
    if extra is None and is_causal:
        extra = _additive(torch.ones(n, n, dtype=torch.bool, device=src.device).triu_(1), src.dtype)
    if extra is not None:
        extra = extra.view(b, h, n, n) if extra.dim() == 3 else extra
        mask = extra if mask is None else mask + extra

    def attend(x: torch.Tensor) -> torch.Tensor:
        q, k, v = attn._q_in_proj(x).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn._q_out_proj(y.transpose(1, 2).reshape(b, n, d))

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        return layer.linear2(layer.activation(layer.linear1(x)))

    x = src
    if layer.norm_first:
        x = x + attend(layer.norm1(x))
        return x + feed_forward(layer.norm2(x))
    x = layer.norm1(x + attend(x))
    return layer.norm2(x + feed_forward(x))


def tied_linear(model: nn.Module) -> set[str]:
    """Linear layers whose weight is shared with another module (GPT's head = token embedding): kept float."""
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def quantize(model: nn.Module) -> tuple[nn.Module, dict, dict]:
    """(quantized model, state to store, quantization spec) of a float model in eval mode on CPU."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    model = model.cpu().eval()
    float_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    quantized = _quantize_dynamic(model)
    state, names = dict(float_state), []
    for name, mod in quantized.named_modules():
        if isinstance(mod, QLinear):
            w, key = mod.weight(), _stored_key(name)
            if w.qscheme() != torch.per_tensor_affine or w.q_zero_point() != 0:
                raise ValueError(f"{name}: unexpected quantization scheme {w.qscheme()}")
            state[key] = w.int_repr().clone()
            state[key + SCALE] = torch.tensor(w.q_scale(), dtype=torch.float64)
            names.append(key)
    return quantized, state, {"method": METHOD, "weights": names}


def _stored_key(module: str) -> str:
    """The float model's state key an int8 layer's weight is stored under ('enc.0.self_attn._q_in_proj' ->
    'enc.0.self_attn.in_proj_weight'), so a stored int8 version loads into a freshly built float model."""
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{ATTENTION[leaf]}" if leaf in ATTENTION else f"{module}.weight"


def _int8_module(model: nn.Module, key: str) -> nn.Module:
    """The quantized layer holding the int8 weight stored under `key` (the inverse of _stored_key)."""
    for leaf, weight in ATTENTION.items():
        if key.endswith("." + weight):
            return model.get_submodule(f"{key.removesuffix(weight)}{leaf}")
    return model.get_submodule(key.removesuffix(".weight"))


def load_weights(model: nn.Module, state: dict, spec: dict, device: torch.device) -> nn.Module:
    """Load stored weights into a freshly built model that will run on `device`: plain, or int8 (dequantized, then
    re-quantized exactly; on a GPU the dequantized float weights)."""
    q = spec.get("quantization")
    if not q:
        model.load_state_dict(state)
        return model
    if q.get("method") != METHOD:
        raise ValueError(f"unknown quantization method {q.get('method')!r}; this aidc knows {METHOD!r}")
    state = dict(state)
    ints = {k: (state[k], float(state.pop(k + SCALE))) for k in q["weights"]}
    for k, (w, scale) in ints.items():
        state[k] = w.float() * scale
    model.load_state_dict(state)
    if device.type == "cuda":
        logger.info("int8 dynamic quantization runs on CPU only: using the dequantized float weights on the GPU")
        return model
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    model = _quantize_dynamic(model.eval())
    for k, (w, scale) in ints.items():
        try:
            mod = _int8_module(model, k)
        except AttributeError:
            mod = None
        if not isinstance(mod, QLinear):
            raise ValueError(f"{k} is stored as int8 but its layer is not quantizable")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod.set_weight_bias(torch._make_per_tensor_quantized_tensor(w, scale, 0), mod.bias())
    return model
