"""The fused forward of one HF decoder layer (Llama, Mistral, Gemma, Qwen2, Qwen3), reading the weights
of the layer's own modules (PEFT LoRA wrappers included) and calling no module's forward:

    h = x + O(attention(RoPE(norm_qk(Q(n))), RoPE(norm_qk(K(n))), V(n))),  n = RMSNorm(x)
    y = h + down(GLU(gate(m), up(m))),                                     m = RMSNorm(h)

Q, K, V run as one fused LoRA Function (they share n), O as another, the MLP as a third. A layer is two
checkpointing parts (:func:`layer_parts`), x -> h and h -> y, each given the checkpointing's
:class:`~fastbench.fused.checkpointing.PartContext`. While a part runs as the last one of a recomputed
unit (``context.recomputing``), its output is only the root of the backward, so its last projection (O,
or the GLU and the down projection) is not recomputed: the Functions return placeholders and save what
their backward needs, and so does the residual sum (``context.residual``). The LoRA Functions share the
model's factor cache (``cache``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from fastbench.fused import varlen_attention
from fastbench.fused.checkpointing.context import PartContext
from fastbench.fused.varlen_attention import PackedSequences
from fastbench.kernels.geglu import geglu, geglu_backward
from fastbench.kernels.lora import (GLU, LoRA, LoraFactorCache, Projection, cached_factor_bytes, lora_mlp,
                                    lora_projections)
from fastbench.kernels.rms_norm import rms_norm, rms_norm_residual
from fastbench.kernels.rope import apply_rope
from fastbench.kernels.swiglu import swiglu, swiglu_backward

SUPPORTED_FAMILIES = ("llama", "mistral", "gemma", "qwen2", "qwen3")


def _geglu(approximate):
    return GLU(functools.partial(geglu, approximate=approximate),
               functools.partial(geglu_backward, approximate=approximate))


_GLUS = {"silu": GLU(swiglu, swiglu_backward), "swish": GLU(swiglu, swiglu_backward),
         "gelu_pytorch_tanh": _geglu("tanh"), "gelu_new": _geglu("tanh"), "gelu": _geglu("none")}


@dataclass(frozen=True)
class Family:
    """What differs between the supported architectures."""
    model_type: str
    norm_offset: float  # Gemma's RMSNorm scales by (1 + w)
    glu: GLU
    qk_norm: bool  # Qwen3 normalises each head of Q and K before RoPE


def family_of(config) -> Family:
    """The :class:`Family` of a transformers config; ValueError naming what is supported otherwise."""
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"fastbench's fused path supports {', '.join(SUPPORTED_FAMILIES)}; "
                         f"this model is {config.model_type!r}")
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act not in _GLUS:
        raise ValueError(f"fastbench's fused MLP supports the activations {', '.join(_GLUS)}; "
                         f"this model uses {act!r}")
    return Family(config.model_type, 1.0 if config.model_type == "gemma" else 0.0, _GLUS[act],
                  config.model_type == "qwen3")


def norm_eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or norm.eps


def _adapter_problem(module, name: str) -> str | None:
    """Why adapter ``name`` of a PEFT LoRA layer cannot run fused, or None."""
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return "LoRA variants (DoRA, ...)"
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "lora_dropout > 0"
    if module.lora_B[name].bias is not None:
        return "lora_bias"
    return None


def _active_loras(module) -> tuple[list[str], str | None]:
    """(the active adapters this PEFT LoRA layer holds, why they cannot run fused or None)."""
    names = [name for name in module.active_adapters if name in module.lora_A]
    for name in names:
        problem = _adapter_problem(module, name)
        if problem:
            return names, problem
    return names, "more than one active adapter" if len(names) > 1 else None


def unsupported_lora(module) -> str | None:
    """Why the fused path cannot run ``module`` (a linear layer, maybe PEFT-wrapped), or None."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return None if hasattr(module, "weight") else f"{type(module).__name__} has no weight"
    if type(module).__name__ not in ("Linear", "Linear4bit"):  # peft.tuners.lora.Linear, lora.bnb.Linear4bit
        return f"PEFT layer type {type(module).__name__}"
    return _active_loras(module)[1]


def projection(module) -> Projection:
    """The frozen weight, bias and active LoRA of a linear layer (nn.Linear, bnb Linear4bit, or a
    PEFT LoRA wrapper of either); no LoRA while adapters are disabled or merged into the weight.
    Raises if the adapters active now cannot run fused (activated after get_peft_model checked them)."""
    base = getattr(module, "base_layer", module)
    lora = None
    if base is not module and not module.disable_adapters and not module.merged:
        names, problem = _active_loras(module)
        if names:
            if problem:
                raise RuntimeError(
                    f"fastbench's fused path cannot run the adapters now active ({problem}: {', '.join(names)}); "
                    "it runs one plain LoRA adapter at a time, without DoRA, dropout or bias. Activate one such "
                    "adapter, or build the model with FastLanguageModel.get_peft_model(..., fallback=True) from "
                    "a config with what you need (it then trains with plain PEFT)")
            lora = LoRA(module.lora_A[names[0]].weight, module.lora_B[names[0]].weight, module.scaling[names[0]])
    return Projection(base.weight, base.bias, lora)


class SdpaMasks:
    """The SDPA masks of one forward, one per attention window, each built when a layer first asks for it:
    (attend, keyless), or None when plain causal attention is exact. ``attend``: boolean [B, 1, T, T], True
    where a query attends a key; ``keyless``: [B, 1, T, 1], True for the queries with no key left
    (left-padding rows), or None when there can be none (no row starts with padding, no window, no packing).

    Key padding comes from the 2D ``attention_mask``; packed sequences from ``position_ids`` restarting at 0;
    a sliding window keeps keys with i - j < window. A keyless query attends to itself only and its output is
    zeroed afterwards: transformers' result (SDPA's zero output for a row with no key), without ever handing a
    kernel a row with no key.

    Whether padding or packing needs a mask is a reduction on the device, and reading it waits for every
    kernel queued before it. It starts here, when the forward starts, and is read (once per forward) at the
    first attention, so the host queues the embedding and the first layer's norm and Q/K/V meanwhile instead
    of waiting with an empty queue.
    """

    def __init__(self, attention_mask, position_ids, B: int, T: int, device):
        self.attention_mask, self.position_ids, self.B, self.T, self.device = attention_mask, position_ids, B, T, device
        self.seq = (position_ids == 0).cumsum(-1) if position_ids is not None else None
        self._runs, self._needed = None, None
        checks = ([] if attention_mask is None else [~attention_mask.bool().all(), ~attention_mask[:, 0].bool().all()]) \
            + ([] if self.seq is None else [(self.seq > 1).any()])
        self._flags, self._ready, self._masks = None, None, {}
        if checks:
            flags = torch.stack(checks)
            if flags.is_cuda:
                self._flags = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
                self._flags.copy_(flags, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record()
            else:
                self._flags = flags

    def _needs(self) -> tuple[bool, bool, bool]:
        """(padded, a row starts with padding, packed), read back from the device the first time."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        if self._needed is None:
            flags = [] if self._flags is None else self._flags.tolist()
            padded, left = (flags.pop(0), flags.pop(0)) if self.attention_mask is not None else (False, False)
            self._needed = (padded, left, self.seq is not None and flags.pop(0))
        return self._needed

    def get(self, window: int | None, varlen: bool = False):
        """(attend, keyless) or None for layers with this sliding window (None: none). With ``varlen`` (the
        caller can run fastbench.fused.varlen_attention), rows without key padding that need a mask (packed,
        or longer than the window) give their PackedSequences instead."""
        key = (window, varlen and self._varlen_applies(window))
        if key not in self._masks:
            self._masks[key] = self._sequences(window) if key[1] else self._build(window)
        return self._masks[key]

    def _varlen_applies(self, window: int | None) -> bool:
        padded, _, packed = self._needs()
        return not padded and (packed or (window is not None and self.T > window))

    def _sequences(self, window: int | None) -> PackedSequences:
        """The rows' runs (each packed sequence, else each row), shared by every window, with ``window``."""
        if self._runs is None:
            packed = self._needs()[2]
            self._runs = PackedSequences.from_position_ids(self.position_ids if packed else None, self.B, self.T,
                                                           self.device)
        return self._runs.with_window(window)

    def _build(self, window):
        windowed = window is not None and self.T > window
        padded, left, packed = self._needs()
        if not (padded or packed or windowed):
            return None
        T, device = self.T, self.device
        i = torch.arange(T, device=device)
        mask = (i[:, None] >= i[None, :])[None, None]
        if windowed:
            mask = mask & ((i[:, None] - i[None, :]) < window)
        if packed:
            mask = mask & (self.seq[:, None, :, None] == self.seq[:, None, None, :])
        if not padded:  # every query keeps itself as a key
            return mask, None
        mask = mask & self.attention_mask.bool()[:, None, None, :]
        if not (left or windowed or packed):  # causal keys from 0 with key 0 kept: no row loses all its keys
            return mask, None
        keyless = ~mask.any(-1, keepdim=True)
        return mask | (torch.eye(T, dtype=torch.bool, device=device) & keyless), keyless


def layer_projections(layer) -> tuple[tuple[Projection, ...], tuple[Projection, ...]]:
    """((Q, K, V, O), (gate, up, down)) of a decoder layer as its modules stand now (which LoRA is active,
    its scale). A part recomputed in the backward takes them from its forward: the adapters may have been
    disabled for the forward (``with model.disable_adapter():``) and enabled again since."""
    attn, mlp = layer.self_attn, layer.mlp
    return (tuple(projection(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)),
            tuple(projection(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)))


def _input_groups(layer) -> tuple[tuple[Projection, ...], ...]:
    """A decoder layer's projections grouped by the input they share, as the fused Functions run them: Q/K/V, O,
    gate/up, down."""
    attn, mlp = layer_projections(layer)
    return attn[:3], attn[3:], mlp[:2], mlp[2:]


def nf4_workspace_bytes(layer) -> int:
    """The bytes of the buffer a layer's NF4 weights are dequantized into (fastbench.kernels.lora): its largest
    single NF4 weight in the compute dtype (the projections of one input dequantized together only where they
    fit it together); 0 without NF4 weights."""
    states = [getattr(p.weight, "quant_state", None) for group in _input_groups(layer) for p in group]
    return max([st.shape[0] * st.shape[1] * st.dtype.itemsize for st in states if st is not None], default=0)


def lora_factor_bytes(layer, dtype: torch.dtype, cache: LoraFactorCache | None = None) -> int:
    """The bytes of a layer's LoRA factors that ``cache`` (the model's LoraFactorCache) keeps cast to ``dtype``
    (the compute dtype) between steps."""
    return sum(cached_factor_bytes(group, dtype, cache) for group in _input_groups(layer))


def attention_residual(layer, x, context: PartContext, cos, sin, mask, family: Family, projections=None,
                       cache: LoraFactorCache | None = None):
    """x + attention(RMSNorm(x)): the first part of a decoder layer, [B, T, hidden] -> [B, T, hidden].
    ``mask``: (attend, keyless), None or PackedSequences (see :class:`SdpaMasks`), or a callable returning it
    (asked for right before the attention, told whether varlen attention takes q); ``projections``: (Q, K, V, O),
    by default the layer's as they stand."""
    attn = layer.self_attn
    q_p, k_p, v_p, o_p = projections or layer_projections(layer)[0]
    n, x = rms_norm_residual(x, layer.input_layernorm.weight, norm_eps(layer.input_layernorm), family.norm_offset)
    B, T, _ = n.shape
    D = attn.head_dim
    q, k, v = lora_projections(n, q_p, k_p, v_p, cache=cache)
    q, k, v = q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D)
    if family.qk_norm:
        q = rms_norm(q, attn.q_norm.weight, norm_eps(attn.q_norm))
        k = rms_norm(k, attn.k_norm.weight, norm_eps(attn.k_norm))
    q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    v = v.transpose(1, 2)
    mask = mask(varlen=varlen_attention.usable(q)) if callable(mask) else mask
    if isinstance(mask, PackedSequences):
        o = varlen_attention.varlen_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                              attn.scaling).reshape(B, T, -1)
    else:
        attend, keyless = mask if mask is not None else (None, None)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, is_causal=attend is None,
                                           scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
        if keyless is not None:
            o = o.masked_fill(keyless, 0.0)
        o = o.transpose(1, 2).reshape(B, T, -1)
    (out,) = lora_projections(o, o_p, graph_only=context.recomputing, cache=cache)
    return context.residual(x, out)


def mlp_residual(layer, h, context: PartContext, family: Family, projections=None,
                 cache: LoraFactorCache | None = None):
    """h + MLP(RMSNorm(h)): the second part of a decoder layer. ``projections``: (gate, up, down), by
    default the layer's as they stand."""
    gate, up, down = projections or layer_projections(layer)[1]
    norm = dict(weight=layer.post_attention_layernorm.weight, eps=norm_eps(layer.post_attention_layernorm),
                offset=family.norm_offset)
    m, h = rms_norm_residual(h, **norm)
    # an MLP whose activations go to the host recomputes m from h, not copies it
    m = context.derived(m, h, functools.partial(rms_norm, **norm))
    return context.residual(h, lora_mlp(m, gate, up, down, family.glu, graph_only=context.recomputing, cache=cache))


def _trainable_by_part(layer, family: Family, attn_projections, mlp_projections) -> tuple[list, list]:
    """The trainable parameters each part reads, each once: (the input norm's, Q/K norms' and Q/K/V/O's; the
    post-attention norm's and gate/up/down's), the tensors its recomputation's gradients are asked for. Taken
    from what the parts read rather than by walking the layer's modules: this runs for each recomputed layer
    at every step."""
    attn = layer.self_attn
    norms = ([layer.input_layernorm.weight] + ([attn.q_norm.weight, attn.k_norm.weight] if family.qk_norm else []),
             [layer.post_attention_layernorm.weight])
    parts = []
    for weights, projections in zip(norms, (attn_projections, mlp_projections)):
        tensors = weights + [t for p in projections for t in (p.weight, p.bias, *(p.lora or ())[:2])]
        seen, part = set(), []
        for t in tensors:
            if t is not None and t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                part.append(t)
        parts.append(part)
    return parts[0], parts[1]


def layer_parts(layer, cos, sin, mask, family: Family, cache: LoraFactorCache | None = None):
    """One decoder layer as the checkpointing parts [(fn(x, context), its trainable parameters)] (see
    fastbench.fused.checkpointing); the parameters are listed when first asked for (only recomputed parts
    ask), in one pass for both parts. The parts hold the layer's projections as they stand now, so a
    recomputation repeats this forward; their LoRA Functions share ``cache``."""
    attn_p, mlp_p = layer_projections(layer)
    trainable = functools.cache(functools.partial(_trainable_by_part, layer, family, attn_p, mlp_p))
    return [(functools.partial(attention_residual, layer, cos=cos, sin=sin, mask=mask, family=family,
                               projections=attn_p, cache=cache), lambda: trainable()[0]),
            (functools.partial(mlp_residual, layer, family=family, projections=mlp_p, cache=cache),
             lambda: trainable()[1])]
