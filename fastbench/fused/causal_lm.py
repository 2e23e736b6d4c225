"""The fused forward of a HF causal LM, installed on one model object (never on its class):

    backbone: embed -> [fused decoder layer, under the model's checkpointing policy] x L -> RMSNorm
    head:     fused linear cross-entropy on the shifted labels (training: no logits materialised)
          or lm_head -> logits (no labels)

Both forwards are replaced, so that trainers that call the backbone themselves (TRL's fused LM
head) run it fused too. Calls the fused path cannot serve exactly (a KV cache: generation; returned attentions or hidden
states) go to the model's own HF forwards, which runs the same weights and adapters.
"""
from __future__ import annotations

import functools
import types
import warnings

import torch
import torch.nn.functional as F

from fastbench.autotune.compiled_cache import ensure_installed
from fastbench.fused.checkpointing import CheckpointConfig, LayerCheckpointing
from fastbench.fused.checkpointing.budget import ModelBytes, optimizer_bytes
from fastbench.fused.decoder import (SdpaMasks, family_of, layer_parts, lora_factor_bytes, nf4_workspace_bytes,
                                     norm_eps, unsupported_lora)
from fastbench.fused.host_embedding import offload_input_embedding
from fastbench.fused.state import FusedState
from fastbench.kernels._tensors import interpreting
from fastbench.kernels.linear_cross_entropy import fused_linear_cross_entropy
from fastbench.kernels.lora import LoraFactorCache
from fastbench.kernels.rms_norm import rms_norm

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _window(model, attn):
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if getattr(model.config, "use_sliding_window", True) is False:  # Qwen2 configs carry a window they do not use
        return None
    return getattr(model.config, "sliding_window", None)


def _hf_forward(module, given: dict, **kwargs):
    """``module``'s own (unpatched) HF forward, with the arguments its caller passed (None ones dropped)."""
    return type(module).forward(module, **{k: v for k, v in given.items() if v is not None}, **kwargs)


def _needs_hf(use_cache, output_attentions, output_hidden_states, kwargs, attention_mask=None) -> bool:
    """Whether this call runs transformers' own forward: a KV cache, attention weights or hidden states asked
    for, or an attention mask other than the 2D key-padding one (a custom 4D mask), which the fused layers do
    not read (said once per process)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        if not _warned_4d_mask:
            _warned_4d_mask.append(True)
            warnings.warn(f"fastbench: a {attention_mask.dim()}D attention_mask runs through transformers' own "
                          "layers (unfused); the fused path reads the 2D padding mask (and packed position_ids)",
                          stacklevel=3)
        return True
    return bool(use_cache or output_attentions or output_hidden_states
                or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None)


_warned_4d_mask: list[bool] = []


def fused_backbone_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                           use_cache=None, output_attentions=None, output_hidden_states=None, **kwargs):
    """The decoder stack (HF ``*Model.forward``): embeddings -> fused layers -> final RMSNorm."""
    if _needs_hf(use_cache, output_attentions, output_hidden_states, kwargs, attention_mask):
        return _hf_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, use_cache=use_cache,
                                      output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states), **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    state: FusedState = self._fastbench
    family = state.family
    state.lora_cache.new_step()  # LoRA factors are cast once per step, after the optimizer changed them
    h = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
    if family.model_type == "gemma" and not hasattr(self.embed_tokens, "embed_scale"):  # older transformers
        h = h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)
    T = h.shape[1]
    packing_ids = position_ids
    if position_ids is None:
        position_ids = torch.arange(T, device=h.device)[None]
    cos, sin = self.rotary_emb(h, position_ids)

    masks = SdpaMasks(attention_mask, packing_ids, h.shape[0], T, h.device)
    for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
        mask = functools.partial(masks.get, _window(self, layer.self_attn))
        h = state.checkpointing(index, h, layer_parts(layer, cos, sin, mask, family, state.lora_cache))
    h = rms_norm(h, self.norm.weight, norm_eps(self.norm), family.norm_offset)
    return BaseModelOutputWithPast(last_hidden_state=h)


def fused_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                  use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                  logits_to_keep=0, num_items_in_batch=None, shift_labels=None, **kwargs):
    """Same arguments and outputs as the HF ``ForCausalLM.forward``; with labels, ``logits`` is None.

    The loss sums the token losses and divides by ``num_items_in_batch`` when given (HF Trainer passes
    the label count of the whole accumulated batch) or by this batch's label count. A batch without a single
    label gives a loss of 0 and zero gradients, where transformers' mean over no tokens gives NaN.
    """
    if _needs_hf(use_cache, output_attentions, output_hidden_states, kwargs, attention_mask):
        return _hf_forward(self, dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                      output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict,
                                      num_items_in_batch=num_items_in_batch, shift_labels=shift_labels),
                           logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    h = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           inputs_embeds=inputs_embeds).last_hidden_state
    loss = logits = None
    if labels is not None or shift_labels is not None:
        if shift_labels is None:
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)
        loss = fused_linear_cross_entropy(h, self.lm_head.weight, shift_labels.to(h.device),
                                          num_items_in_batch=num_items_in_batch)
    else:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
    out = CausalLMOutputWithPast(loss=loss, logits=logits)
    return out.to_tuple() if return_dict is False else out


def unsupported_reason(model) -> str | None:
    """Why the fused forward cannot run this (PEFT-wrapped) causal LM exactly, or None."""
    try:
        family_of(model.config)
    except ValueError as e:
        return str(e)
    if next(model.parameters()).device.type != "cuda" and not interpreting():
        return ("its Triton kernels need a CUDA GPU; on a CPU, start Python with TRITON_INTERPRET=1 to run them "
                "(slowly) in Triton's interpreter")
    inner = model.get_decoder()
    if not isinstance(model.lm_head, torch.nn.Linear) or model.lm_head.bias is not None:
        return "LoRA or modules_to_save on lm_head"
    if not isinstance(inner.embed_tokens, torch.nn.Embedding):
        return "LoRA or modules_to_save on embed_tokens"
    for layer in inner.layers:
        for name in _PROJECTIONS:
            reason = unsupported_lora(layer.get_submodule(name))
            if reason:
                return f"{reason} ({name})"
    return None


def install(model, config: CheckpointConfig) -> list[str]:
    """Gives ``model`` (the causal LM inside a PeftModel) the fused forward, checkpointed as ``config`` says;
    returns what changed."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"fastbench's fused path cannot run this model: {reason}")
    ensure_installed()  # the shipped compiled kernels into Triton's cache, before the path's first launch
    backbone = model.get_decoder()
    layers = backbone.layers[: model.config.num_hidden_layers]
    workspace = max((nf4_workspace_bytes(layer) for layer in layers), default=0)
    cache = LoraFactorCache(workspace_bytes=workspace or None)
    counts = None
    if config.mode == "budget":  # what the plan counts besides the activations
        compute = backbone.embed_tokens.weight.dtype  # the activations'
        counts = ModelBytes(optimizer=optimizer_bytes(model.parameters()), workspace=workspace,
                            vocab=model.lm_head.weight.shape[0],
                            factors=sum(lora_factor_bytes(layer, compute, cache) for layer in layers))
    checkpointing = LayerCheckpointing(config, layers=len(layers), model=counts)
    backbone._fastbench = FusedState(family_of(model.config), checkpointing, cache)
    backbone.forward = types.MethodType(fused_backbone_forward, backbone)
    model.forward = types.MethodType(fused_forward, model)
    changed = [f"{type(backbone).__name__}.forward (this object only): fused LoRA QKV/O/MLP, RMSNorm, RoPE, SDPA; "
               f"{checkpointing.describe()}",
               f"{type(model).__name__}.forward (this object only): fused linear cross-entropy, no logits with labels"]
    embedding = offload_input_embedding(model) if config.offload is not None and config.offload.embedding else None
    return changed + [embedding] if embedding else changed
