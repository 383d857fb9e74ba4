"""Run attnzoo methods inside diffusers models (FLUX, SD3, DiT, UNet) through their attention processors.

Each patched attention module gets a processor that wraps the module's own (native) processor: the
native code computes the projections, the q/k norms and the rotary embeddings as it always does, and
its one ``scaled_dot_product_attention`` call is routed to the attnzoo method (a
``TorchFunctionMode`` active only during that processor's call). So with ``dense`` a patched model
computes what the native model computes, and rotary embeddings are applied before the method.

Token layout: a forward pre-hook on the model records each call's latent grid (``(H, W) //
patch_size`` of a 4-D latent; the ``img_ids`` rows and columns of packed FLUX latents) and its text
tokens (``encoder_hidden_states``). A layer's image tokens form that grid or, in a UNet's lower
levels, the grid downsampled by 2, 4, ... (ceil). Joint-attention processors (FLUX, SD3) attend over
text and image tokens together: the text tokens become the method's ``num_global`` leading tokens
(SD3 puts them last; they are moved first for the method and back after).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

try:
    from diffusers import DiffusionPipeline, ModelMixin
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("attnzoo.patch on diffusers models needs diffusers: pip install 'attnzoo[diffusers]' (or pip install diffusers)") from e

from ...errors import InvalidArgumentError, UnsupportedError
from ...method import Method
from ...registry import method_class
from ..transformers.plan import TokenLayout, _Methods, call_method

_STATE = "_attnzoo_diffusers_patch"
METHOD_ATTR = "attnzoo_method"
# native processors whose __call__ computes attention with exactly one scaled_dot_product_attention over
# the whole (joint) sequence, and where their text tokens sit in it: None (self-attention only), "first", "last"
TEXT_PLACEMENT: dict[type, str | None] = {AttnProcessor2_0: None, FluxAttnProcessor: "first", JointAttnProcessor2_0: "last"}


# ---- the latent layout of each call -----------------------------------------------------------
@dataclass
class LatentLayout:
    """What the model's current call lays out: the image-token ``grid`` (H, W) at full resolution
    and the number of ``text`` tokens (None before the first call)."""

    grid: tuple[int, int] | None = None
    text: int = 0

    def record(self, model, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Read the grid and the text tokens from a model call's arguments."""
        latent = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.text = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
        self.grid = self._grid(model, latent, kwargs.get("img_ids"))

    @staticmethod
    def _grid(model, latent, img_ids) -> tuple[int, int] | None:
        if isinstance(img_ids, torch.Tensor):  # FLUX: packed latents, one (0, row, col) id per token
            ids = img_ids[0] if img_ids.dim() == 3 else img_ids
            rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
            if ids.shape[0] != rows * cols or not torch.equal(ids[:, 1:].long().cpu(), expected):
                raise UnsupportedError("attnzoo diffusers patch: img_ids do not lay the image tokens out as a row-major grid "
                                       f"(got {ids.shape[0]} ids spanning {rows} x {cols}); pass grid= explicitly")
            return rows, cols
        if isinstance(latent, torch.Tensor) and latent.dim() == 4:  # (B, C, H, W), patchified by patch_size
            patch = getattr(model.config, "patch_size", None) or 1
            return latent.shape[2] // patch, latent.shape[3] // patch
        return None

    def image_grid(self, tokens: int) -> tuple[int, int]:
        """The grid of a layer with ``tokens`` image tokens: the call's grid downsampled by 1, 2, 4, ..."""
        if self.grid is None:
            raise UnsupportedError("attnzoo diffusers patch: no latent grid recorded; call the patched model itself (its forward records "
                                   "the latent shape) or pass grid= explicitly")
        height, width = self.grid
        stride = 1
        while stride <= max(height, width):
            grid = (math.ceil(height / stride), math.ceil(width / stride))
            if math.prod(grid) == tokens:
                return grid
            stride *= 2
        raise InvalidArgumentError("image tokens", f"the latent grid {self.grid} or a downsampling of it by a power of 2", tokens)


# ---- routing the native processor's attention call ----------------------------------------------
class _RouteAttention(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` calls to ``run(q, k, v, scale)``, counting them."""

    def __init__(self, run):
        super().__init__()
        self.run, self.calls = run, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args)), **kwargs}
        if call.get("attn_mask") is not None:
            raise UnsupportedError(f"attnzoo diffusers patch: the model passes an attention mask of shape {tuple(call['attn_mask'].shape)}, "
                                   "which attnzoo methods do not take (e.g. a padded text prompt); call without it")
        if call.get("dropout_p", 0.0) or call.get("is_causal", False):
            raise UnsupportedError(f"attnzoo diffusers patch: attention dropout {call.get('dropout_p', 0.0)} / is_causal="
                                   f"{call.get('is_causal', False)} are not supported; call model.eval()")
        return self.run(call["query"], call["key"], call["value"], call.get("scale"))


class RoutedProcessor:
    """Wraps one module's native processor; its attention runs ``method`` (see the module docstring)."""

    def __init__(self, native, patch: DiffusersPatch, method: Method | None, placement: str | None):
        self.native, self.patch, self.method, self.placement = native, patch, method, placement
        self.checked = False

    def _call(self, attn, args, kwargs):
        route = _RouteAttention(self._attend)
        with route:
            out = self.native(attn, *args, **kwargs)
        if route.calls != 1:
            raise UnsupportedError(f"attnzoo diffusers patch: {type(self.native).__name__} computed attention through "
                                   f"{route.calls} scaled_dot_product_attention calls (expected exactly 1); an attention backend "
                                   "set with diffusers' set_attention_backend bypasses it: reset it to 'native'")
        return out

    def _attend(self, q, k, v, scale):
        """q, k, v (B, H, N, D): the native processor's joint sequence -> (B, H, N, Dv)."""
        text = self.patch.layout.text if self.placement else 0
        if self.placement == "last" and text:  # SD3: [image, text] -> [text, image] for the method
            q, k, v = (t.roll(text, dims=2) for t in (q, k, v))
        method = self.method or self.patch.spatial_method(q.shape[2] - text, text)
        out = call_method(method, q, k, v, causal=False, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                          check_finite=not self.checked)
        self.checked = True
        return out.roll(-text, dims=2) if self.placement == "last" and text else out


@functools.lru_cache(maxsize=None)
def _processor_class(native_cls: type) -> type:
    """A :class:`RoutedProcessor` class whose ``__call__`` shows ``native_cls.__call__``'s signature
    (diffusers passes a processor only the keyword arguments its signature names)."""

    @functools.wraps(native_cls.__call__)
    def __call__(self, attn, *args, **kwargs):
        return self._call(attn, args, kwargs)

    return type(f"Attnzoo{native_cls.__name__}", (RoutedProcessor,), {"__call__": __call__})


def _guarded_set_processor(original):
    """A module's ``set_processor`` while patched: only attnzoo's processors pass (to ``original``)."""
    def set_processor(processor):
        if not isinstance(processor, RoutedProcessor):
            raise UnsupportedError(f"attnzoo: this model is patched, so its attention processors cannot change to {type(processor).__name__} "
                                   "(set_attn_processor, enable_attention_slicing, fuse_qkv_projections, ...); "
                                   "attnzoo.unpatch(model) first")
        original(processor)
    return set_processor


# ---- the patch -------------------------------------------------------------------------------------
@dataclass
class DiffusersPatch:
    """Handle returned by :func:`patch`; ``with patch(...) as model:`` unpatches on exit."""

    model: Any
    denoiser: Any
    spec: Any
    config: dict[str, Any]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    originals: dict[str, Any] = field(default_factory=dict)
    layout: LatentLayout = field(default_factory=LatentLayout)
    _methods: dict[TokenLayout, Method] = field(default_factory=dict)
    _hook: Any = None

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        unpatch(self.model)

    def spatial_method(self, image_tokens: int, text: int) -> Method:
        """The method on this call's layout: ``image_tokens`` on the latent's grid after ``text`` global tokens."""
        given = self.config.get("grid")
        if given is not None:
            if math.prod(given) != image_tokens:
                raise InvalidArgumentError("grid", f"a grid of the layer's {image_tokens} image tokens", f"{tuple(given)} (product "
                                           f"{math.prod(given)}); the latent gives {self.layout.image_grid(image_tokens)}")
            tokens = TokenLayout(tuple(given), text)
        else:
            tokens = TokenLayout(self.layout.image_grid(image_tokens), text)
        if tokens not in self._methods:
            options = {k: v for k, v in self.config.items() if k != "grid"}
            self._methods[tokens] = _Methods(tokens).get(self.spec, options, "method")
        return self._methods[tokens]

    def describe(self) -> dict[str, str]:
        """{attention module name: native processor it wraps}."""
        return {name: type(self.originals[name]).__name__ for name in self.modules}

    def __repr__(self) -> str:
        return f"DiffusersPatch({type(self.denoiser).__name__}, method={self.spec!r}, modules={len(self.modules)})"


def denoiser_of(model):
    """The denoising network of a pipeline (``transformer`` or ``unet``), or ``model`` itself."""
    if isinstance(model, DiffusionPipeline):
        for name in ("transformer", "unet"):
            component = getattr(model, name, None)
            if isinstance(component, ModelMixin):
                return component
        raise UnsupportedError(f"attnzoo.patch: {type(model).__name__} has no transformer or unet component to patch")
    if not isinstance(model, ModelMixin):
        raise InvalidArgumentError("model", "a diffusers ModelMixin or DiffusionPipeline", type(model).__name__)
    return model


def attention_modules(denoiser) -> dict[str, torch.nn.Module]:
    """{name: module} of the self- and joint-attention modules of a diffusers model (cross-attention left out)."""
    found = {name: m for name, m in denoiser.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")
             and not getattr(m, "is_cross_attention", False)}
    if not found:
        raise UnsupportedError(f"attnzoo.patch: {type(denoiser).__name__} has no diffusers attention module (set_processor)")
    unsupported = sorted({type(m.processor).__name__ for m in found.values() if type(m.processor) not in TEXT_PLACEMENT})
    if unsupported:
        raise UnsupportedError(f"attnzoo.patch: attention processor type(s) {', '.join(unsupported)} are not supported (supported: "
                               f"{', '.join(sorted(c.__name__ for c in TEXT_PLACEMENT))}); set the model's default processors first")
    return found


def _heads(module) -> tuple[int, int]:
    """(heads, head_dim) of a diffusers attention module."""
    heads = module.heads
    head_dim = getattr(module, "head_dim", None) or module.inner_dim // heads
    return heads, head_dim


def _check_method(spec, config: Mapping[str, Any], joint: bool) -> None:
    cls = type(spec) if isinstance(spec, Method) else method_class(spec)
    info = cls.info
    if not info.non_causal:
        raise UnsupportedError(f"method {info.name!r} is causal only; diffusion models attend bidirectionally")
    if joint and info.spatial and "num_global" not in {f.name for f in dataclasses.fields(cls.Config)}:
        raise UnsupportedError(f"method {info.name!r} takes no global tokens (no num_global option), so it cannot take the joint "
                               "text + image tokens of this model's attention (FLUX / SD3 joint attention)")
    if isinstance(spec, Method) and config:
        raise InvalidArgumentError("config", "no options with a configured Method", sorted(config))


def patch(model, method, **config) -> DiffusersPatch:
    """Run attention ``method`` (a registered name with ``**config``, or a configured :class:`Method`)
    in every self- and joint-attention module of a diffusers model or pipeline; reversible with
    :func:`unpatch`. Spatial methods get the latent grid of each call and the text tokens as
    ``num_global`` (a ``grid=`` given is checked against it). Methods without a layout (linear ones)
    get one instance per module, materialised at its heads and head size, as a submodule
    ``attnzoo_method`` of the module (so it moves with ``.to()`` and lands in ``state_dict``)."""
    denoiser = denoiser_of(model)
    unpatch(model)
    unpatch(denoiser)
    modules = attention_modules(denoiser)
    joint = any(TEXT_PLACEMENT[type(m.processor)] for m in modules.values())
    _check_method(method, config, joint)
    if "grid" in config:
        config = {**config, "grid": tuple(config["grid"])}
    handle = DiffusersPatch(model, denoiser, method, dict(config), modules, {name: m.processor for name, m in modules.items()})
    # a spatial method named here is built per call layout (DiffusersPatch.spatial_method); others once per module
    spatial = not isinstance(method, Method) and method_class(method).info.spatial
    processors = {}
    for name, module in modules.items():
        native = module.processor
        own = None
        if not spatial:
            own = method if isinstance(method, Method) else _Methods(None).get(method, config, "method")
            heads, head_dim = _heads(module)
            own.materialize(heads, heads, head_dim, head_dim)
            setattr(module, METHOD_ATTR, own)
        processors[name] = _processor_class(type(native))(native, handle, own, TEXT_PLACEMENT[type(native)])
    _set_processors(denoiser, modules, processors)
    for module in modules.values():
        module.set_processor = _guarded_set_processor(type(module).set_processor.__get__(module))
    handle._hook = denoiser.register_forward_pre_hook(lambda m, args, kwargs: handle.layout.record(m, args, kwargs), with_kwargs=True)
    setattr(model, _STATE, handle)
    if denoiser is not model:
        setattr(denoiser, _STATE, handle)
    return handle


def _set_processors(denoiser, modules: Mapping[str, torch.nn.Module], processors: Mapping[str, Any]) -> None:
    """Through the model's ``set_attn_processor`` where it has one (all its processors: the given
    ones, the others unchanged), else per module."""
    if hasattr(denoiser, "set_attn_processor") and hasattr(denoiser, "attn_processors"):
        current = dict(denoiser.attn_processors)
        current.update({f"{name}.processor": p for name, p in processors.items()})
        denoiser.set_attn_processor(current)
    else:
        for name, processor in processors.items():
            modules[name].set_processor(processor)


def current_patch(model) -> DiffusersPatch | None:
    """The :class:`DiffusersPatch` installed on ``model`` (a model or pipeline), or None."""
    return getattr(model, _STATE, None)


def unpatch(model) -> bool:
    """Restore the native processors; True if ``model`` was patched."""
    handle = current_patch(model)
    if handle is None:
        return False
    for module in handle.modules.values():
        del module.set_processor
        if hasattr(module, METHOD_ATTR):
            delattr(module, METHOD_ATTR)
    _set_processors(handle.denoiser, handle.modules, handle.originals)
    handle._hook.remove()
    for obj in {id(handle.model): handle.model, id(handle.denoiser): handle.denoiser}.values():
        if hasattr(obj, _STATE):
            delattr(obj, _STATE)
    return True


__all__ = ["DiffusersPatch", "LatentLayout", "RoutedProcessor", "TEXT_PLACEMENT", "attention_modules", "current_patch", "denoiser_of",
           "patch", "unpatch"]
