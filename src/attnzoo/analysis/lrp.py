"""``analysis.lrp``: AttnLRP (Achtibat et al., ICML 2024) relevance for llama- and bert-family
transformers models, written from the paper's rules.

Relevance is computed as input times a modified gradient, which equals layer-wise relevance
propagation when each operation's backward pass follows its rule:

- linear layers and additions (residuals, RoPE): the epsilon rule with epsilon -> 0, which is the
  plain gradient (biases absorb their share);
- elementwise activations (SiLU, GELU, tanh): the identity rule, relevance passes unchanged
  (backward multiplies by f(x) / x);
- bilinear products (q . k, attention . v, the gate * up product of gated MLPs): the uniform rule,
  each factor gets half (backward halves the gradient of each factor);
- softmax: the paper's rule R_in = x (R_out - s sum(R_out)), which is the plain gradient times the
  input;
- LayerNorm and RMSNorm: the identity rule on the normalisation, so the standard deviation is a
  constant (detached) and the layer is linear.

Bias-free llama models conserve relevance through every rule but the softmax; the bias terms of
the softmax rule and of bert's linear layers, LayerNorm shifts and position embeddings absorb the
rest. :class:`Relevance` reports the totals layer by layer so the gap can be read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedError
from .record import model_inputs

IMPLEMENTATION = "attnzoo_lrp"
RULE_ATTR = "_attnzoo_lrp_rule"
RULES = ("attnlrp", "cp", "gradient")
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})
BERT_FAMILY = frozenset({"bert", "roberta"})
ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Tanh, nn.ReLU)


class _IdentityRule(torch.autograd.Function):
    """y = f(x) forward; backward scales the gradient by y / x so that x * grad_x = y * grad_y."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        ratio = torch.where(x.abs() > 1e-12, y / torch.where(x.abs() > 1e-12, x, torch.ones_like(x)), torch.zeros_like(x))
        return grad * ratio, None


class _UniformProduct(torch.autograd.Function):
    """a * b (elementwise) or a @ b; backward gives each factor half of the plain gradient."""

    @staticmethod
    def forward(ctx, a, b, matmul: bool):
        ctx.save_for_backward(a, b)
        ctx.matmul = matmul
        return a @ b if matmul else a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        if ctx.matmul:
            return 0.5 * (grad @ b.transpose(-1, -2)), 0.5 * (a.transpose(-1, -2) @ grad), None
        return 0.5 * grad * b, 0.5 * grad * a, None


def uniform_product(a: torch.Tensor, b: torch.Tensor, *, matmul: bool = False) -> torch.Tensor:
    """``a @ b`` or ``a * b`` under the uniform (half-half) relevance rule."""
    return _UniformProduct.apply(a, b, matmul)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _allowed(module, query, key, value, attention_mask, causal: bool, scale: float, window: int | None) -> torch.Tensor | None:
    """(B|1, 1|H, Nq, Nk) bool pattern: the model's mask (or causal pattern), narrowed on a patched
    layer to the support of its methods' probabilities (what the method keeps)."""
    from ..integrations.transformers.adapter import PLAN_ATTR
    from ..integrations.transformers.padding import bool_mask
    from ..kernels.dense import causal_mask

    plan = getattr(module, PLAN_ATTR, None)
    if plan is not None and plan.runs(query.shape[2], key.shape[2], window):
        with torch.no_grad():
            return plan.probabilities(query, key, value, attention_mask, causal, scale) > 0
    if attention_mask is not None:
        return bool_mask(attention_mask)
    return causal_mask(query.shape[2], key.shape[2], query.device) if causal else None


def _lrp_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs):
    """transformers attention function with AttnLRP's rules: (B, Nq, H, Dv) output and the probabilities."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    heads = query.shape[1]
    k, v = _repeat_heads(key, heads), _repeat_heads(value, heads)
    scores = uniform_product(query, k.transpose(-1, -2), matmul=True) * scale
    allowed = _allowed(module, query, key, value, attention_mask, causal, scale, kwargs.get("sliding_window"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if getattr(module, RULE_ATTR, "attnlrp") == "cp":
        out = probs.detach() @ v
    else:
        out = uniform_product(probs, v, matmul=True)
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _lrp_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    rms = torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).detach()
    return module.weight * (x.float() / rms).to(x.dtype)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps).detach()
    out = centred / std
    if module.weight is not None:
        out = out * module.weight
    return out + module.bias if module.bias is not None else out


def _activation(original, x: torch.Tensor) -> torch.Tensor:
    return _IdentityRule.apply(x, original(x))


def _gated_mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(uniform_product(module.act_fn(module.gate_proj(x)), module.up_proj(x)))


@contextmanager
def _override(module: nn.Module, forward) -> Iterator[None]:
    """Temporarily give ``module`` the instance attribute ``forward``."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def family(model) -> str:
    """"llama" or "bert" (the families whose every nonlinearity has a rule here), else UnsupportedError."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in BERT_FAMILY:
        return "bert"
    raise UnsupportedError(f"analysis.lrp: model_type {model_type!r} is not a llama-family ({sorted(LLAMA_FAMILY)}) or "
                           f"bert-family ({sorted(BERT_FAMILY)}) model; its operations may have no AttnLRP rule here")


@contextmanager
def _attribute(module: nn.Module, name: str, value) -> Iterator[None]:
    setattr(module, name, value)
    try:
        yield
    finally:
        delattr(module, name)


@contextmanager
def attnlrp_rules(model, rule: str = "attnlrp") -> Iterator[None]:
    """Within the block, ``model`` computes its usual forward pass and AttnLRP's backward pass
    (``rule="cp"``: attention probabilities held constant, CP-LRP, all relevance to the values;
    ``rule="gradient"``: the plain backward pass, so relevance is gradient x input)."""
    from ..integrations.transformers import attention_modules

    family(model)
    if rule not in RULES:
        raise InvalidArgumentError("rule", f"one of {RULES}", repr(rule))
    if rule == "gradient":
        yield
        return
    _register()
    previous = model.config._attn_implementation
    with ExitStack() as stack:
        for layer in attention_modules(model):
            stack.enter_context(_attribute(layer.module, RULE_ATTR, rule))
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                stack.enter_context(_override(module, partial(_layer_norm, module)))
            elif type(module).__name__.endswith("RMSNorm"):
                stack.enter_context(_override(module, partial(_rms_norm, module)))
            elif isinstance(module, ACTIVATIONS) or type(module).__module__ == "transformers.activations":
                stack.enter_context(_override(module, partial(_activation, module.forward)))
            elif all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                stack.enter_context(_override(module, partial(_gated_mlp, module)))
        model.set_attn_implementation(IMPLEMENTATION)
        stack.callback(model.set_attn_implementation, previous)
        yield


@dataclass
class Relevance:
    """AttnLRP relevance of one explained logit per batch item. ``tokens`` (B, N): relevance of
    each input position where it enters the first transformer block (summed over the hidden
    size: token and, in bert, position embeddings after the embedding LayerNorm); ``logit`` (B,): the explained logit; ``target``
    (B,): its class or vocabulary index; ``position``: the explained position (None for pooled
    outputs); ``layers`` (B, L): the total relevance entering each transformer block;
    ``token_strings``: per item, the token strings where a tokenizer was given."""

    tokens: torch.Tensor
    logit: torch.Tensor
    target: torch.Tensor
    position: int | None
    layers: torch.Tensor
    token_strings: list[list[str]] | None = None
    input_ids: torch.Tensor | None = None

    def conservation_error(self) -> torch.Tensor:
        """(B,) |sum of token relevance - logit| / |logit|."""
        return (self.tokens.sum(-1) - self.logit).abs() / self.logit.abs().clamp_min(1e-12)


def transformer_blocks(model) -> list[nn.Module]:
    """The model's transformer blocks in order: the ModuleList whose items hold the attention modules."""
    from ..integrations.transformers import attention_modules

    attention = [layer.module for layer in attention_modules(model)]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(attention) and \
                all(any(m is a for m in block.modules()) for block, a in zip(module, attention)):
            return list(module)
    raise UnsupportedError(f"analysis.lrp: found no list of transformer blocks in {type(model).__name__}")


def _select(logits: torch.Tensor, target, position: int | None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(B,) logits at ``position`` (3-d outputs) of ``target`` (None: the argmax) and the targets."""
    if logits.dim() == 3:
        n = logits.shape[1]
        position = n - 1 if position is None else position
        if not -n <= position < n:
            raise InvalidArgumentError("position", f"a token position in [-{n}, {n - 1}]", position)
        position %= n
        logits = logits[:, position]
    else:
        position = None
    classes = logits.shape[-1]
    if target is None:
        chosen = logits.detach().argmax(-1)
    else:
        chosen = torch.as_tensor(target, device=logits.device).long().reshape(-1).expand(logits.shape[0])
        if (chosen < 0).any() or (chosen >= classes).any():
            raise InvalidArgumentError("target", f"class indices in [0, {classes - 1}]", target)
    return logits.gather(-1, chosen[:, None])[:, 0], chosen, position


def lrp(model, inputs: object, *, target: int | None = None, position: int | None = None, tokenizer=None,
        rule: str = "attnlrp") -> Relevance:
    """AttnLRP relevance of the logit ``target`` (default: the predicted one) at ``position``
    (default: the last token; ignored for (B, C) classifier outputs) of a llama- or bert-family
    ``model`` in eval mode, over its input tokens. ``inputs``: see :func:`~.record.model_inputs`.
    Returns a :class:`Relevance`. Works on patched models (patched layers: the exact softmax over
    the method's support). ``rule="cp"`` holds attention constant (CP-LRP), the baseline AttnLRP
    improves on; ``rule="gradient"`` gives plain gradient x input (patched layers then backpropagate
    through the method itself)."""
    if model.training:
        raise InvalidArgumentError("model", "a model in eval mode (dropout has no relevance rule)", "training mode")
    kwargs = model_inputs(model, inputs, tokenizer)
    inputs_seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, args, kw: inputs_seen.append(args[0] if args else kw["hidden_states"]),
                                           with_kwargs=True) for b in transformer_blocks(model)]
    try:
        with attnlrp_rules(model, rule), torch.enable_grad():
            output = model(**kwargs)
            logits = output.logits if hasattr(output, "logits") else output[0]
            logit, chosen, position = _select(logits, target, position)
            grads = torch.autograd.grad(logit.sum(), inputs_seen)
    finally:
        for h in handles:
            h.remove()
    per_position = [(x * g).detach().sum(-1) for x, g in zip(inputs_seen, grads)]  # (B, N) per block
    ids = kwargs["input_ids"].cpu()
    strings = None if tokenizer is None else [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    return Relevance(tokens=per_position[0].cpu(), logit=logit.detach().cpu(), target=chosen.cpu(), position=position,
                     layers=torch.stack([r.sum(-1) for r in per_position], dim=-1).cpu(), token_strings=strings, input_ids=ids)
