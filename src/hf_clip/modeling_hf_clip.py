"""CLIP (Radford et al., 2021) on transformers' `PreTrainedModel` API.

Two towers map images and texts into one embedding space; the model is trained to pick which caption goes
with which image. The image tower is the paper's modified ResNet (three-conv stem, anti-aliased strided
blocks, attention pooling) or a ViT (class token, `ln_pre`); the text tower is a causal transformer read at
the end-of-text token. This file imports only its sibling config so `trust_remote_code` can copy it flat.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig

logger = logging.get_logger(__name__)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation the released OpenAI weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _may_overwrite(output: torch.Tensor, *producers: nn.Module) -> bool:
    """Whether a fresh intermediate may be updated in place: nothing needs it for backward, and no hook on
    the modules that made or receive it (interpretability code captures these) could hold a reference."""
    if (torch.is_grad_enabled() and output.requires_grad) or torch.jit.is_tracing():
        return False  # a trace would keep the in-place op for later calls that may need gradients
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in producers)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class _KeepsAutocastWeights:
    """Inference under autocast with fp32 weights (a user running a fp32 checkpoint in bf16) casts every
    weight on every call: a third of a ViT-B/32 forward on CPU. In eval mode without gradients the cast
    copy is kept until the weight changes (its version counter, storage, dtype or the autocast dtype);
    training, where autocast's own per-forward cache applies, never keeps one, nor does a layer whose
    weights accelerate loads on demand (`device_map` offloading), which a kept copy would defeat, nor a
    parametrized one (its weight is recomputed on every access). Writes through `weight.data` bypass the
    version counter: after such an update, call `model.eval()` (any `train()` call drops the copies)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    _cast: tuple[Any, ...] | None = None  # (key, weight, bias, cast weight, cast bias)

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = x.device.type
        if (
            self.training
            or torch.is_grad_enabled()
            or self.weight.dtype != torch.float32
            or not torch.is_autocast_enabled(device)
            or torch.compiler.is_compiling()
            or hasattr(self, "_hf_hook")
            or parametrize.is_parametrized(self)
        ):
            return self.weight, self.bias
        dtype = torch.get_autocast_dtype(device)
        weight, bias = self.weight, self.bias
        key = (dtype, weight.data_ptr(), weight._version, None if bias is None else bias._version)
        # The tensors themselves are compared too: a new one may reuse a freed one's address and version.
        cast = self._cast
        if cast is None or cast[0] != key or cast[1] is not weight or cast[2] is not bias:
            cast = self._cast = (
                key,
                weight,
                bias,
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
            )
        return cast[3], cast[4]

    def train(self, mode: bool = True) -> nn.Module:
        self._cast = None
        return super().train(mode)  # type: ignore[misc]


class HfClipLinear(_KeepsAutocastWeights, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self._weights(x))


class HfClipConv2d(_KeepsAutocastWeights, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self._weights(x))


def plain_torch_layers(model: nn.Module) -> nn.Module:
    """Make hf_clip's own linear and convolution layers (`HfClipLinear`, `HfClipConv2d`) the plain `nn.Linear`
    and `nn.Conv2d` they extend, in place; returns `model`. Same parameters, names and numbers: only the
    cast weights that `_KeepsAutocastWeights` keeps between fp32 inference calls under autocast are given up.

    For tools that match layer types exactly rather than with `isinstance`: torch.ao's
    `quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` quantised none of an hf_clip model's layers
    (silently: the model came back unchanged), and its quantised Linear refuses a subclass even when named.
    The ViT's patch embedding (`HfClipPatchEmbedding`, a convolution run as one GEMM) is kept."""
    plain = {HfClipLinear: nn.Linear, HfClipConv2d: nn.Conv2d}
    layers = [m for m in model.modules() if type(m) in plain]
    if any(hasattr(m, "_hf_hook") for m in layers):
        raise ValueError(
            "plain_torch_layers cannot convert layers that accelerate offloads (`device_map` with CPU or disk "
            "offload): their hooks call the hf_clip layer's own forward. Load the model without offloading."
        )
    for m in layers:
        m.__dict__.pop("_cast", None)
        m.__class__ = plain[type(m)]
    return model


class HfClipPatchEmbedding(HfClipConv2d):
    """The ViT's patch convolution (kernel = stride, no padding) run as one GEMM over the flattened patches:
    the same parameter and result, but a backward made of GEMMs. On CPU, oneDNN's bf16 convolution backward
    took 273 ms of a 2.9 s ViT-B/32 training step at batch 32; as a GEMM the step is 1.1x faster (fp32
    unchanged). Returns the convolution's [batch, width, rows, cols] as a view of the GEMM's output."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.kernel_size
        if (
            k[0] != k[1]
            or self.stride != k
            or self.padding != (0, 0)
            or self.dilation != (1, 1)
            or self.groups != 1
        ):
            raise ValueError(
                "HfClipPatchEmbedding is a square patchify (kernel = stride, no padding, dilation or groups); "
                f"got kernel {k}, stride {self.stride}, padding {self.padding}. Use HfClipConv2d for others."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p = self.kernel_size[0]
        rows, cols = height // p, width // p
        x = x[..., : rows * p, : cols * p]  # a convolution drops the remainder too
        patches = x.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        weight, bias = self._weights(x)
        out = F.linear(patches.reshape(batch, rows * cols, -1), weight.reshape(weight.shape[0], -1), bias)
        # A view with the batch named, not `unflatten`: the TorchScript ONNX exporter typed unflatten's output
        # with the example's batch size and folded it into the class token's expand, so the exported image
        # tower failed at any other batch size.
        return out.transpose(1, 2).view(batch, -1, rows, cols)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention on [batch, heads, seq, dim]; kept for `attn_implementation="eager"`."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _slow_cpu_sdpa_backward(q: torch.Tensor) -> bool:
    """PyTorch's CPU flash-attention backward in bf16 is slow at CLIP's short sequences: forward + backward at
    batch 32 took 43 ms against 15 ms for plain matmul-softmax attention (ViT-B/32 image, 50 tokens) and
    27 against 6.6 ms (causal text, 42 tokens); at 197 tokens (ViT-B/16) SDPA wins, 127 against 159 ms, and
    in fp32 the two are within 10% up to 77 tokens. Training in bf16 on CPU therefore uses eager attention
    up to the text context of 77 tokens: a ViT-B/32 step 1.28x faster. Inference keeps SDPA's fast forward."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and q.shape[-2] <= 77


def _rows_at(x: torch.Tensor, at: int | torch.Tensor) -> torch.Tensor:
    """`x[:, at]` kept as a sequence of one: [batch, seq, ...] -> [batch, 1, ...]. `at` is one position for
    every row (a ViT's class token) or one per row (each caption's end-of-text token)."""
    if isinstance(at, int):
        return x[:, at : at + 1]
    return x[torch.arange(x.shape[0], device=x.device), at].unsqueeze(1)


def _attention(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal_mask: torch.Tensor | None,
    pooled_at: int | torch.Tensor | None = None,
    need_weights: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to the configured kernel. Causality is a flag for SDPA/flash and a cached additive mask for eager.
    With `pooled_at` the queries are those of one position per row (see `_rows_at`). `need_weights` runs
    eager attention for this call, the one kernel that forms the attention weights (`output_attentions`)."""
    impl = module.config._attn_implementation or "sdpa"
    if need_weights or (impl == "sdpa" and _slow_cpu_sdpa_backward(q)):
        impl = "eager"
    scaling = module.head_dim**-0.5
    if pooled_at is not None and causal_mask is not None:
        # A single query per row, at its own position: causality becomes a per-row mask over the keys. Plain
        # SDPA (or eager) takes it in any configuration; the other kernels' masks mean padding.
        at = torch.as_tensor(pooled_at, device=k.device).reshape(-1, 1, 1, 1)
        keep = torch.arange(k.shape[-2], device=k.device) <= at
        if impl == "eager":
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
            return eager_attention_forward(module, q, k, v, mask, scaling=scaling)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling)
        return out.transpose(1, 2), None
    if impl == "eager":
        mask = None
        if causal_mask is not None:
            mask = causal_mask[: q.shape[-2], : k.shape[-2]].to(q.dtype)
        return eager_attention_forward(module, q, k, v, mask, scaling=scaling)
    fn: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
    return fn(
        module, q, k, v, None, scaling=scaling, dropout=0.0, is_causal=causal_mask is not None, **kwargs
    )


class HfClipAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (the layout of OpenAI's `in_proj_weight`)."""

    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.is_causal = False
        self.qkv_proj = HfClipLinear(self.embed_dim, 3 * self.embed_dim)
        self.out_proj = HfClipLinear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        causal_mask: torch.Tensor | None = None,
        pooled_at: int | torch.Tensor | None = None,
        attentions: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`pooled_at`: the output for that one position per row alone (its query against the keys and values
        it may see; see `_rows_at`). The projection stays one call of the fused module, which adapters (LoRA)
        and quantisers may replace. `attentions`: a list this call appends its attention weights to."""
        batch, seq, width = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if pooled_at is not None:
            q = _rows_at(q.transpose(1, 2), pooled_at).transpose(1, 2)
        out, weights = _attention(self, q, k, v, causal_mask, pooled_at, need_weights=attentions is not None)
        if attentions is not None:
            attentions.append(weights)
        return self.out_proj(out.reshape(batch, q.shape[2], width))


class HfClipMLP(nn.Module):
    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.fc1 = HfClipLinear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)
        self.fc2 = HfClipLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # Hooks anywhere inside fc1 count (a LoRA wrapper's base layer returns this very tensor).
        if (
            isinstance(self.act, QuickGELU)
            and h is not x
            and _may_overwrite(h, *self.fc1.modules(), self.act)
        ):
            # One temporary instead of three, bit-identical: ViT-B/16 images at batch 32 1.08x (fp32) and
            # 1.13x (bf16) on CPU, where each fresh [batch, tokens, 4 * width] tensor is paid in page faults.
            return self.fc2(h.mul_(torch.mul(h, 1.702).sigmoid_()))
        return self.fc2(self.act(h))


class HfClipEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HfClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HfClipMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        causal_mask: torch.Tensor | None = None,
        pooled_at: int | torch.Tensor | None = None,
        attentions: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        residual = hidden_states if pooled_at is None else _rows_at(hidden_states, pooled_at)
        hidden_states = residual + self.self_attn(
            self.layer_norm1(hidden_states), causal_mask, pooled_at, attentions
        )
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class HfClipEncoder(nn.Module):
    def __init__(self, config: HfClipTextConfig | HfClipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([HfClipEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        causal_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        pooled_at: int | torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """`pooled_at`: the last layer computes the output at that position (one per row, or one for all)
        alone, the only one pooling reads; every layer before it still needs every position. Returns the
        last hidden state, the hidden states and the attention weights (each None unless asked for)."""
        all_states = (hidden_states,) if output_hidden_states else None
        attentions: list[torch.Tensor] | None = [] if output_attentions else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, causal_mask, pooled_at if i == last else None, attentions)
            if output_hidden_states:
                all_states += (hidden_states,)
        return hidden_states, all_states, None if attentions is None else tuple(attentions)


def _resize_grid(pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a square grid of position embeddings [n*n, C] to new_grid (h, w)."""
    side = int(math.isqrt(pos.shape[0]))
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos.dtype)


def _check_pixels(pixel_values: torch.Tensor, channels: int) -> None:
    """The layout the towers read. (A ViT's patch embedding runs as a GEMM, whose own error for a wrong channel
    count, "mat1 and mat2 shapes cannot be multiplied", would not say what is wrong.)"""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; the image tower takes [batch, {channels}, "
            f"height, width] (config num_channels={channels}). Use the model's image processor, add a batch "
            "dimension to a single image (`pixel_values[None]`), and convert grayscale or RGBA images to RGB."
        )


def _check_size(height: int, width: int, expected: int, interpolate: bool, multiple: int) -> None:
    if interpolate:
        if height % multiple or width % multiple:
            raise ValueError(
                f"Input size {height}x{width} must be a multiple of {multiple} for this image tower."
            )
        return
    if height != expected or width != expected:
        raise ValueError(
            f"Input image size ({height}x{width}) does not match the model ({expected}x{expected}). "
            "Resize with the model's image processor, or pass interpolate_pos_encoding=True to resample the "
            "position embeddings."
        )


def _refuse_unsupported(kwargs: dict[str, Any]) -> None:
    """transformers' arguments hf_clip cannot honour, refused rather than ignored wherever they are passed."""
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions is not supported by get_text_features / get_image_features, which return the "
            "embeddings alone. Call the model (or HfClipTextModel / HfClipVisionModel) with "
            "output_attentions=True: the weights come back in its outputs' `attentions`."
        )
    if kwargs.get("position_ids") is not None:
        raise ValueError("position_ids is not supported: positions are always 0..length-1, as in CLIP.")


class HfClipPreTrainedModel(PreTrainedModel):
    config_class = HfClipConfig
    config: HfClipConfig
    base_model_prefix = "hf_clip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _no_split_modules = ["HfClipEncoderLayer", "HfClipBottleneck", "HfClipAttentionPool"]

    def _call_options(
        self, output_hidden_states: bool | None, return_dict: bool | None, kwargs: dict[str, Any]
    ) -> tuple[bool, bool, bool]:
        """transformers' call conventions: None means the config's value. What cannot be honoured is refused
        rather than ignored. Returns (output_hidden_states, output_attentions, return_dict). Attention weights
        are formed by eager attention for the call that asks for them, whatever `attn_implementation` is."""
        attentions = kwargs.pop("output_attentions", None)
        attentions = self.config.output_attentions if attentions is None else attentions
        _refuse_unsupported(kwargs)
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        as_dict = (self.config.return_dict if return_dict is None else return_dict) is not False
        return bool(hidden), bool(attentions), as_dict

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, *args: Any, **kwargs: Any
    ) -> nn.Embedding:
        """transformers' resize, refusing sizes that would drop the start- or end-of-text token: the tower pools
        at the latter, and a config naming an id past its vocabulary does not load again."""
        text = getattr(self.config, "text_config", self.config)
        specials = [i for i in (text.bos_token_id, text.eos_token_id) if i is not None]
        if new_num_tokens is not None and specials and new_num_tokens <= max(specials):
            raise ValueError(
                f"new_num_tokens={new_num_tokens} would drop the special token id {max(specials)} "
                f"(bos_token_id={text.bos_token_id}, eos_token_id={text.eos_token_id}); keep at least "
                f"{max(specials) + 1} tokens, or set new special ids in the config first."
            )
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # `_init_weights` initialises layers from the module that knows their role (an attention block sets
        # its projections' scale), and those parents hold no parameters of their own. transformers skips, for
        # code outside its package, every module whose own parameters are all loaded, which such a parent
        # trivially passes: fresh models then kept PyTorch's default initialisation, and weights missing from
        # a checkpoint (a new projection size, an added layer) stayed uninitialised memory, often NaN. The
        # `transformers.initialization` functions used below already leave loaded tensors alone.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise as the released code does: scaled normals in the text tower, zero-gamma ResNet blocks."""
        factor = self.config.initializer_factor
        if isinstance(module, HfClipTextTransformer):
            std = module.config.token_embedding_std * factor
            init.normal_(module.embeddings.token_embedding.weight, std=std)
            init.normal_(module.embeddings.position_embedding.weight, std=0.01 * factor)
        elif isinstance(module, HfClipVisionTransformer):
            scale = module.config.hidden_size**-0.5 * factor
            init.normal_(module.embeddings.class_embedding, std=scale)
            init.normal_(module.embeddings.position_embedding.weight, std=scale)
            init.kaiming_uniform_(module.embeddings.patch_embedding.weight, a=math.sqrt(5))
        elif isinstance(module, HfClipAttention):
            width, layers = module.embed_dim, module.config.num_hidden_layers
            if isinstance(module.config, HfClipTextConfig):
                init.normal_(module.qkv_proj.weight, std=width**-0.5 * factor)
                init.normal_(module.out_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5 * factor)
            else:  # the released ViT keeps nn.MultiheadAttention's own initialisation
                init.xavier_uniform_(module.qkv_proj.weight)
                init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            init.zeros_(module.qkv_proj.bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, HfClipMLP):
            width, layers = module.config.hidden_size, module.config.num_hidden_layers
            if isinstance(module.config, HfClipTextConfig):
                init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
                init.normal_(module.fc2.weight, std=width**-0.5 * (2 * layers) ** -0.5 * factor)
            else:
                init.kaiming_uniform_(module.fc1.weight, a=math.sqrt(5))
                init.kaiming_uniform_(module.fc2.weight, a=math.sqrt(5))
            init.zeros_(module.fc1.bias)
            init.zeros_(module.fc2.bias)
        elif isinstance(module, HfClipAttentionPool):
            std = module.c_proj.in_features**-0.5 * factor
            init.normal_(module.position_embedding, std=std)
            for proj in (module.q_proj, module.k_proj, module.v_proj, module.c_proj):
                init.normal_(proj.weight, std=std)
                init.zeros_(proj.bias)
        elif isinstance(module, HfClipBottleneck):
            init.zeros_(module.bn3.weight)  # each residual block starts as the identity
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, HfClipModel):
            init.normal_(
                module.text_projection.weight, std=module.config.text_config.hidden_size**-0.5 * factor
            )
            if isinstance(module.visual_projection, nn.Linear):
                init.normal_(
                    module.visual_projection.weight,
                    std=module.config.vision_config.hidden_size**-0.5 * factor,
                )
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, module.config.logit_bias_init_value)
        elif isinstance(module, HfClipForImageClassification):
            if isinstance(module.visual_projection, nn.Linear):
                init.normal_(
                    module.visual_projection.weight,
                    std=module.config.vision_config.hidden_size**-0.5 * factor,
                )
            if isinstance(module.classifier, nn.Linear):
                # Unit-norm features: a small head starts near uniform predictions, as a fresh linear probe.
                init.normal_(module.classifier.weight, std=0.02 * factor)
                init.zeros_(module.classifier.bias)
        elif isinstance(module, HfClipTextModelWithProjection):
            init.normal_(module.text_projection.weight, std=module.config.hidden_size**-0.5 * factor)
        elif isinstance(module, HfClipVisionModelWithProjection) and isinstance(
            module.visual_projection, nn.Linear
        ):
            init.normal_(module.visual_projection.weight, std=module.config.hidden_size**-0.5 * factor)
        if isinstance(module, HfClipTextTransformer):
            n = module.config.max_position_embeddings
            init.copy_(module.causal_mask, torch.full((n, n), float("-inf")).triu_(1))

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        """Also record every Auto class in `auto_map`, so the folder loads with `trust_remote_code=True`."""
        if self._auto_class is not None:
            config = self.config
            # Entries for hf_clip's other model classes go: a config copied from a contrastive model must not
            # send AutoModel to HfClipModel for a folder without a text tower.
            auto_map = {
                key: value
                for key, value in (getattr(config, "auto_map", None) or {}).items()
                if not str(value).startswith("modeling_hf_clip.")
            }
            auto_map.setdefault("AutoConfig", f"configuration_hf_clip.{config.__class__.__name__}")
            name = type(self).__name__
            for auto_class in _AUTO_CLASSES.get(name, ()):
                auto_map[auto_class] = f"modeling_hf_clip.{name}"
            for auto_class, other in _LOADS_AS.get(name, {}).items():
                auto_map[auto_class] = f"modeling_hf_clip.{other}"
            config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)


class HfClipTextEmbeddings(nn.Module):
    """Token plus position embeddings. A called module (not parameters read from outside) so that accelerate's
    offloading hooks (`device_map` with CPU or disk offload) bring its weights in before they are used."""

    def __init__(self, config: HfClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class HfClipTextTransformer(HfClipPreTrainedModel):
    """Causal transformer over BPE tokens; the sequence is summarised at its first end-of-text token."""

    config_class = HfClipTextConfig
    config: HfClipTextConfig

    def __init__(self, config: HfClipTextConfig) -> None:
        super().__init__(config)
        self.embeddings = HfClipTextEmbeddings(config)
        self.encoder = HfClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Built once: eager attention adds it, the fused kernels only need the is_causal flag.
        n = config.max_position_embeddings
        mask = torch.full((n, n), float("-inf")).triu_(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        output_hidden_states: bool = False,
        trim: bool | TrimLength = False,
        pooled_only: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """`trim=True` drops the positions after the batch's last end-of-text token before running the
        encoder: under the causal mask they never reach the pooled features, so `pooler_output` is unchanged
        while a short caption padded to 77 tokens costs only its own length. `last_hidden_state` then stops
        at that position. A `TrimLength` made earlier from the same ids trims without a fresh host sync.

        `pooled_only=True` runs the last block for each caption's end-of-text token alone (its query against
        the keys before it, its out projection and MLP), the only position pooling reads: `pooler_output` is
        unchanged to float rounding, and `last_hidden_state` holds that token only ([batch, 1, width]).
        Hidden states and attention weights, when asked for, are for every position: neither shortcut is
        taken then."""
        seq = input_ids.shape[-1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"Text is {seq} tokens long but the model's context is {self.config.max_position_embeddings}; "
                f"tokenize with truncation=True, max_length={self.config.max_position_embeddings}."
            )
        # First end-of-text position: correct whether padding uses 0 or the end-of-text id itself.
        index = (
            trim.index if isinstance(trim, TrimLength) else _eos_index(input_ids, self.config.eos_token_id)
        )
        every_position = output_hidden_states or output_attentions
        if trim and not every_position and _can_trim(input_ids) and index.numel():
            seq = trim.get() if isinstance(trim, TrimLength) else TrimLength(index).get()
            input_ids = input_ids[:, :seq]
        x = self.embeddings(input_ids)
        pooled_at = index if pooled_only and not every_position else None
        x, states, attentions = self.encoder(
            x, self.causal_mask, output_hidden_states, pooled_at, output_attentions
        )
        x = self.final_layer_norm(x)
        pooled = x[:, 0] if pooled_at is not None else x[torch.arange(x.shape[0], device=x.device), index]
        return BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=states, attentions=attentions
        )


def _right_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Rows padded on the left (a tokenizer with `padding_side="left"`) moved to start at position 0.

    The tower numbers positions from 0 and pools at the end-of-text token, so padding belongs after the text;
    left-padded ids would shift every position embedding. Each row is rotated by its count of leading
    masked positions: device ops only, no host sync. Right-padded rows are unchanged."""
    if attention_mask is None:
        return input_ids
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
            "pass the mask the tokenizer returned with these ids."
        )
    seq = input_ids.shape[-1]
    lead = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)
    return input_ids.gather(-1, (torch.arange(seq, device=input_ids.device) + lead) % seq)


def _in_input_order(out: BaseModelOutputWithPooling, attention_mask: torch.Tensor | None) -> None:
    """Undo `_right_aligned` on the per-position outputs, in place: position j of `last_hidden_state` and of
    each hidden state is again token j of the ids as given, so the caller's attention mask lines up with them
    (masked mean pooling, token-level features); attention weights are restored along queries and keys.
    Outputs trimmed to a shorter length are left as they are."""
    if attention_mask is None:
        return
    seq = attention_mask.shape[-1]
    lead = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)
    index = ((torch.arange(seq, device=attention_mask.device) - lead) % seq).unsqueeze(-1)

    def restore(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index.expand(-1, -1, x.shape[-1])) if x.shape[1] == seq else x

    if out.last_hidden_state is not None:
        out.last_hidden_state = restore(out.last_hidden_state)
    if out.hidden_states is not None:
        out.hidden_states = tuple(restore(h) for h in out.hidden_states)
    if out.attentions is not None:  # [batch, heads, query, key]
        heads = out.attentions[0].shape[1] if out.attentions else 0
        rows = index.view(-1, 1, seq, 1).expand(-1, heads, -1, seq)
        cols = index.view(-1, 1, 1, seq).expand(-1, heads, seq, -1)
        out.attentions = tuple(
            a.gather(2, rows).gather(3, cols) if a.shape[-1] == seq else a for a in out.attentions
        )


def _eos_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Each row's first end-of-text position (the last position where a row has none)."""
    is_eos = input_ids == eos_token_id
    last = torch.full_like(input_ids[..., 0], input_ids.shape[-1] - 1)
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), last)


class TrimLength:
    """The caption length a batch is trimmed to (up to its last first end-of-text token), read on the host.

    Reading a GPU value on the host waits for every kernel queued before it. `HfClipModel.forward` makes
    this before queueing the image tower and reads it after: the copy is then long done, and the GPU never
    idles waiting for the host to queue the text tower. (Read after the image tower, as a plain `.item()`
    there did, a profiled ViT-B/16 training step on an H200 left the GPU idle for about 13% of the step,
    against about 3% in transformers' CLIPModel: benchmarks/bench_attention_layout.py.)"""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index  # each row's first end-of-text position, reused for pooling
        length = index.max() + 1
        self._event = None
        if length.device.type == "cuda":
            self._host = length.to("cpu", non_blocking=True)  # pinned, asynchronous
            self._event = torch.cuda.Event()
            # On the stream the copy was queued on: that of the ids' GPU, whichever GPU is current.
            self._event.record(torch.cuda.current_stream(length.device))
        else:
            self._host = length

    def get(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host)


def _can_trim(input_ids: torch.Tensor) -> bool:
    """Trimming reads the end-of-text positions on the host: not possible while tracing or compiling (a
    data-dependent shape) or on the meta device."""
    return not (input_ids.device.type == "meta" or torch.jit.is_tracing() or torch.compiler.is_compiling())


def _drop_patches(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the class token and a random subset of patch tokens, a fresh subset per image (FLIP)."""
    batch, patches, width = x.shape[0], x.shape[1] - 1, x.shape[2]
    keep = max(1, int(round(patches * (1.0 - fraction))))
    index = torch.rand(batch, patches, device=x.device).argsort(dim=-1)[:, :keep] + 1
    kept = x.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
    return torch.cat([x[:, :1], kept], dim=1)


class HfClipVisionEmbeddings(nn.Module):
    """Patch embedding, class token and position embeddings (resampled for other image sizes); a called
    module for the same reason as `HfClipTextEmbeddings`."""

    def __init__(self, config: HfClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = HfClipPatchEmbedding(
            config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        grid = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(grid * grid + 1, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patch = self.config.patch_size
        x = (
            self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self.position_embedding(torch.arange(self.position_embedding.num_embeddings, device=x.device))
        if (height, width) != (self.config.image_size,) * 2:
            pos = torch.cat([pos[:1], _resize_grid(pos[1:], (height // patch, width // patch))])
        return x + pos


class HfClipVisionTransformer(HfClipPreTrainedModel):
    """ViT image tower: bias-free patch convolution, class token, `ln_pre`, encoder, LayerNorm on the class token."""

    config_class = HfClipVisionConfig
    config: HfClipVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: HfClipVisionConfig) -> None:
        super().__init__(config)
        width = config.hidden_size
        self.embeddings = HfClipVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.encoder = HfClipEncoder(config)
        self.post_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """`pooled_only=True` runs the last block for the class token alone: the pooled features read only
        that token, so `pooler_output` is unchanged (to float rounding) while the last block's out
        projection and MLP run one row instead of 50 (ViT-B/32) or 197 (ViT-B/16): about 1/12 of the
        tower's work. `last_hidden_state` then holds the class token only. Not taken when hidden states or
        attention weights are asked for."""
        _check_pixels(pixel_values, self.config.num_channels)
        height, width = pixel_values.shape[-2:]
        _check_size(height, width, self.config.image_size, interpolate_pos_encoding, self.config.patch_size)
        x = self.embeddings(pixel_values)
        if self.training and self.config.patch_dropout > 0:
            x = _drop_patches(x, self.config.patch_dropout)
        x = self.pre_layernorm(x)
        pooled_at = 0 if pooled_only and not (output_hidden_states or output_attentions) else None
        x, states, attentions = self.encoder(x, None, output_hidden_states, pooled_at, output_attentions)
        pooled = self.post_layernorm(x[:, 0])
        return BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=states, attentions=attentions
        )


def _in_backward() -> bool:
    """Whether this runs inside an autograd backward pass: where `torch.utils.checkpoint` (reentrant or not)
    recomputes a checkpointed layer's forward. False while compiling: a traced forward is never this Python
    code run again (and the check would break the graph at every block)."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Training-mode batch norms inside `module` normalise with the batch's statistics as usual, but update
    copies of `running_mean`, `running_var` and `num_batches_tracked` that are then dropped. (Copies rather than
    no statistics: non-reentrant checkpointing requires the recomputation to save the same tensors.)"""
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    kept = [{name: getattr(m, name) for name in names} for m in norms]
    for m, buffers in zip(norms, kept):
        for name, buffer in buffers.items():
            if buffer is not None:
                setattr(m, name, buffer.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, kept):
            for name, buffer in buffers.items():
                setattr(m, name, buffer)


class HfClipBottleneck(GradientCheckpointingLayer):
    """ResNet bottleneck whose stride is an average pool before the last 1x1 conv (anti-aliasing), as in the paper."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = HfClipConv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = HfClipConv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = HfClipConv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential()
            self.downsample.add_module("pool", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("conv", HfClipConv2d(inplanes, planes * self.expansion, 1, bias=False))
            self.downsample.add_module("bn", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _in_backward():
            # Gradient checkpointing runs this block's forward a second time during the backward pass; its
            # batch norms must then normalise with the same batch statistics but not fold them into the
            # running statistics again (which would apply every step's update twice, momentum 0.19 not 0.1).
            with _running_stats_frozen(self):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        # In place, as torchvision does: batch norm's backward needs its input, not its output.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        out += identity
        return F.relu(out, inplace=True)


class HfClipAttentionPool(nn.Module):
    """Replaces global average pooling: one attention layer whose query is the mean of the spatial tokens."""

    def __init__(self, config: HfClipVisionConfig, spatial: int, embed_dim: int, output_dim: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = embed_dim // self.num_heads
        self.is_causal = False
        self.position_embedding = nn.Parameter(torch.zeros(spatial * spatial + 1, embed_dim))
        self.q_proj = HfClipLinear(embed_dim, embed_dim)
        self.k_proj = HfClipLinear(embed_dim, embed_dim)
        self.v_proj = HfClipLinear(embed_dim, embed_dim)
        self.c_proj = HfClipLinear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor, attentions: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`attentions`: a list to append the pool's weights to, [batch, heads, 1, 1 + height * width]
        (the mean token's query against itself and every spatial position)."""
        batch, channels, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pos = self.position_embedding
        if height * width + 1 != pos.shape[0]:
            pos = torch.cat([pos[:1], _resize_grid(pos[1:], (height, width))])
        x = x + pos.to(x.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x))
        out, weights = _attention(self, q, k, v, None, need_weights=attentions is not None)
        if attentions is not None:
            attentions.append(weights)
        return self.c_proj(out.reshape(batch, channels))


class HfClipResNet(HfClipPreTrainedModel):
    """The paper's modified ResNet: three-conv stem with average pooling, anti-aliased stages, attention pooling."""

    config_class = HfClipVisionConfig
    config: HfClipVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: HfClipVisionConfig) -> None:
        super().__init__(config)
        width = config.hidden_size
        self.conv1 = HfClipConv2d(config.num_channels, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = HfClipConv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = HfClipConv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(config.resnet_layers):
            planes = width * 2**i
            stage = [HfClipBottleneck(inplanes, planes, 1 if i == 0 else 2)]
            inplanes = planes * HfClipBottleneck.expansion
            stage += [HfClipBottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = HfClipAttentionPool(
            config, config.image_size // 32, width * 32, config.projection_dim
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.conv1

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        pooled_only: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutputWithPooling:
        """`pooled_only` is accepted for a common tower interface: the attention pool already computes its
        one query alone. The tower's one attention layer is that pool: `output_attentions` returns its
        weights, one tensor [batch, heads, 1, 1 + grid cells]."""
        _check_pixels(pixel_values, self.config.num_channels)
        _check_size(*pixel_values.shape[-2:], self.config.image_size, interpolate_pos_encoding, 32)
        # Channels-last activations: oneDNN's and cuDNN's fast convolution layout (1.25x fp32, 1.9x bf16 for
        # RN50 on CPU, benchmarks/bench_inference.py); the weights keep their layout.
        x = pixel_values.to(dtype=self.conv1.weight.dtype, memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = self.avgpool(F.relu(self.bn3(self.conv3(x)), inplace=True))
        states = (x,) if output_hidden_states else None
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            if output_hidden_states:
                states += (x,)
        attentions: list[torch.Tensor] | None = [] if output_attentions else None
        pooled = self.attnpool(x, attentions)
        return BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=states,
            attentions=None if attentions is None else tuple(attentions),
        )


def build_vision_tower(config: HfClipVisionConfig) -> nn.Module:
    return HfClipResNet(config) if config.vision_type == "resnet" else HfClipVisionTransformer(config)


def _visual_projection(config: HfClipVisionConfig) -> nn.Module:
    # The ResNet attention pool already ends in the embedding width (its c_proj); the ViT needs a projection.
    if config.vision_type == "resnet":
        return nn.Identity()
    return HfClipLinear(config.hidden_size, config.projection_dim, bias=False)


def _image_features(
    model: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool
) -> torch.Tensor:
    """`model.visual_projection` of the pooled image features, a ViT's last block run for the class token alone."""
    out = model.vision_model(pixel_values, interpolate_pos_encoding, pooled_only=True)
    return model.visual_projection(out.pooler_output)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


def contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix of one (local) batch."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels)) / 2


def sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) for models with a learned logit bias."""
    signs = 2 * torch.eye(logits_per_text.shape[0], device=logits_per_text.device) - 1
    return -F.logsigmoid(signs * logits_per_text).sum() / logits_per_text.shape[0]


@dataclass
class HfClipOutput(ModelOutput):
    """Outputs of `HfClipModel`; embeddings are L2-normalised, logits are scaled by exp(logit_scale)."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    # The multiplier exp(logit_scale) (and SigLIP's bias) as used here, with their graphs: a training loss over
    # the global batch needs them, and under ZeRO-3 the parameters are only materialised inside forward.
    logit_scale: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """transformers' CLIPOutput layout (the temperature and bias stay attributes of the dict form)."""
        return tuple(
            self[k].to_tuple() if k in ("text_model_output", "vision_model_output") else self[k]
            for k in self.keys()
            if k not in ("logit_scale", "logit_bias")
        )


@dataclass
class HfClipTextModelOutput(ModelOutput):
    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfClipVisionModelOutput(ModelOutput):
    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class HfClipTextModel(HfClipPreTrainedModel):
    """The text tower without projection; `pooler_output` holds the end-of-text features."""

    config_class = HfClipTextConfig
    config: HfClipTextConfig
    input_modalities = ("text",)
    _with_projection = False

    def __init__(self, config: HfClipTextConfig) -> None:
        super().__init__(config)
        self.text_model = HfClipTextTransformer(config)
        if self._with_projection:
            self.text_projection = HfClipLinear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embeddings.token_embedding = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        """`attention_mask` only serves to undo left padding: the tower is causal and pools at the end-of-text
        token, so padding after it never changes the result (see `_right_aligned`). The per-position outputs
        come back in the order of the ids as given."""
        hidden, attentions, as_dict = self._call_options(output_hidden_states, return_dict, kwargs)
        out = self.text_model(
            _right_aligned(input_ids, attention_mask),
            output_hidden_states=hidden,
            output_attentions=attentions,
        )
        _in_input_order(out, attention_mask)
        out = self._project(out)
        return out if as_dict else out.to_tuple()

    def _project(self, out: BaseModelOutputWithPooling) -> ModelOutput:
        return out


class HfClipVisionModel(HfClipPreTrainedModel):
    """The image tower without projection (for a ResNet, `pooler_output` is the attention pool's output)."""

    config_class = HfClipVisionConfig
    config: HfClipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _with_projection = False

    def __init__(self, config: HfClipVisionConfig) -> None:
        super().__init__(config)
        self.vision_model = build_vision_tower(config)
        if self._with_projection:
            self.visual_projection = _visual_projection(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The first layer applied to the pixels (a ViT's patch embedding, a ResNet's first convolution), as
        transformers' CLIPVisionModel returns: `enable_input_require_grads` hooks it for adapters trained
        with reentrant gradient checkpointing."""
        return self.vision_model.get_input_embeddings()

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        hidden, attentions, as_dict = self._call_options(output_hidden_states, return_dict, kwargs)
        out = self.vision_model(pixel_values, interpolate_pos_encoding, hidden, output_attentions=attentions)
        out = self._project(out)
        return out if as_dict else out.to_tuple()

    def _project(self, out: BaseModelOutputWithPooling) -> ModelOutput:
        return out


class HfClipTextModelWithProjection(HfClipTextModel):
    """The text tower and its projection: `text_embeds` live in the joint space."""

    _with_projection = True

    def _project(self, out: BaseModelOutputWithPooling) -> ModelOutput:
        return HfClipTextModelOutput(
            text_embeds=self.text_projection(out.pooler_output),
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class HfClipVisionModelWithProjection(HfClipVisionModel):
    """The image tower and its projection: `image_embeds` live in the joint space."""

    _with_projection = True

    def _project(self, out: BaseModelOutputWithPooling) -> ModelOutput:
        return HfClipVisionModelOutput(
            image_embeds=self.visual_projection(out.pooler_output),
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class HfClipModel(HfClipPreTrainedModel):
    """Both towers, their projections into the joint space, and the learned temperature."""

    def __init__(self, config: HfClipConfig) -> None:
        super().__init__(config)
        if "HfClipForImageClassification" in (config.architectures or []):
            logger.warning(
                "This config was saved with an image classifier (HfClipForImageClassification), whose folder has "
                "no text tower: the contrastive model built from it has a random text tower and temperature, and "
                "scores text at chance. Load it with AutoModelForImageClassification."
            )
        self.text_model = HfClipTextTransformer(config.text_config)
        self.vision_model = build_vision_tower(config.vision_config)
        self.text_projection = HfClipLinear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = _visual_projection(config.vision_config)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        bias = config.logit_bias_init_value
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embeddings.token_embedding = value
        # The text tower has its own config object: keep both sizes (saved and reloaded) the same.
        self.text_model.config.vocab_size = self.config.text_config.vocab_size = value.num_embeddings

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Projected, unnormalised text embeddings [batch, projection_dim]. Captions are trimmed after the
        batch's last end-of-text token, and the last block runs for those tokens alone (`pooled_only`): no
        embedding changes, texts/s 1.05-1.07x at batch 32 (CPU, fp32). `attention_mask` only serves to undo
        left padding."""
        _refuse_unsupported(kwargs)
        input_ids = _right_aligned(input_ids, attention_mask)
        return self.text_projection(self.text_model(input_ids, trim=True, pooled_only=True).pooler_output)

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any
    ) -> torch.Tensor:
        """Projected, unnormalised image embeddings [batch, projection_dim]. A ViT's last block runs for the
        class token alone (`pooled_only`), which changes no embedding."""
        _refuse_unsupported(kwargs)
        return _image_features(self, pixel_values, interpolate_pos_encoding)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> HfClipOutput | tuple[Any, ...]:
        """Contrastive logits (and the loss with `return_loss=True`). Only what reaches the embeddings runs:
        captions are trimmed after the batch's last end-of-text token, and a ViT's last block runs for the
        class token alone, which changes no embedding (nor gradient). `text_model_output.last_hidden_state`
        then stops at that token, and `vision_model_output.last_hidden_state` is None for a ViT (rather than
        a tensor without patch tokens); `output_hidden_states=True` or `output_attentions=True` runs and returns
        every position and token.
        (The text tower's last block is not cut down here as in `get_text_features`: a training step gained
        nothing measurable, 0.99-1.00x, and its hidden states stay available.) `attention_mask` only serves
        to undo left padding."""
        output_hidden_states, output_attentions, as_dict = self._call_options(
            output_hidden_states, return_dict, kwargs
        )
        every_position = output_hidden_states or output_attentions
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "HfClipModel.forward needs both input_ids and pixel_values; use get_text_features or "
                "get_image_features for one modality."
            )
        input_ids = _right_aligned(input_ids, attention_mask)
        trim: bool | TrimLength = not every_position
        if trim and _can_trim(input_ids) and input_ids.numel():
            # Queued before the image tower, read after it: see TrimLength.
            trim = TrimLength(_eos_index(input_ids, self.config.text_config.eos_token_id))
        vision_out = self.vision_model(
            pixel_values,
            interpolate_pos_encoding,
            output_hidden_states,
            pooled_only=True,
            output_attentions=output_attentions,
        )
        text_out = self.text_model(
            input_ids,
            output_hidden_states=output_hidden_states,
            trim=trim,
            output_attentions=output_attentions,
        )
        _in_input_order(text_out, attention_mask)
        if not every_position and isinstance(self.vision_model, HfClipVisionTransformer):
            # The class token alone ran the last block: see the docstring. A new output, because setting a
            # ModelOutput field to None leaves the old value in its dict (`out[0]`, `to_tuple()`, `keys()`).
            vision_out = BaseModelOutputWithPooling(pooler_output=vision_out.pooler_output)
        image_embeds = _normalize(self.visual_projection(vision_out.pooler_output))
        text_embeds = _normalize(self.text_projection(text_out.pooler_output))
        scale = self.logit_scale.exp()
        logits_per_text = scale * text_embeds @ image_embeds.t().to(text_embeds.dtype)
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        logits_per_image = logits_per_text.t()
        loss = None
        if return_loss:
            loss = (
                contrastive_loss(logits_per_text)
                if self.logit_bias is None
                else sigmoid_loss(logits_per_text)
            )
        output = HfClipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_out,
            vision_model_output=vision_out,
            logit_scale=scale,
            logit_bias=self.logit_bias,
        )
        return output if as_dict else output.to_tuple()


class HfClipForImageClassification(HfClipPreTrainedModel):
    """The image tower with a linear classifier on its L2-normalised joint-space embedding, for fine-tuning
    (`AutoModelForImageClassification`, `pipeline("image-classification")`, the Trainer).

    transformers' CLIPForImageClassification classifies the mean of a ViT's patch tokens. Here the classifier
    reads the embedding that zero-shot classification compares with prompts: every tower has one (ResNets
    too), and `from_zero_shot` can then start the classifier as the zero-shot one, with its logits exactly,
    the starting point of fine-tuning recipes such as WiSE-FT (Wortsman et al., 2022) and LP-FT. Loads from
    any hf_clip model folder with `num_labels=...`; the text tower is not loaded."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = [
        r"^text_model\.",
        r"^text_projection\.",
        r"^logit_scale$",
        r"^logit_bias$",
    ]

    def __init__(self, config: HfClipConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = build_vision_tower(config.vision_config)
        self.visual_projection = _visual_projection(config.vision_config)
        self.classifier = (
            nn.Linear(config.projection_dim, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.get_input_embeddings()

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any
    ) -> torch.Tensor:
        """Projected, unnormalised image embeddings [batch, projection_dim], the classifier's input before its
        L2 normalisation (as `HfClipModel.get_image_features`, so the evaluations take either model)."""
        _refuse_unsupported(kwargs)
        return _image_features(self, pixel_values, interpolate_pos_encoding)

    @classmethod
    def from_zero_shot(cls, model: HfClipModel, classifier: Any) -> HfClipForImageClassification:
        """A classifier whose logits equal `classifier`'s (a `ZeroShotClassifier` built from `model`): the
        image tower and projection of `model`, and a head holding exp(logit_scale) times the ensembled class
        embeddings (plus the logit bias of a sigmoid-loss model; softmax scores ignore it). Labels are the
        classes' first names. Fine-tuning then starts from zero-shot accuracy rather than chance."""
        weights = classifier.weights
        if weights.ndim != 2 or weights.shape[1] != model.config.projection_dim:
            raise ValueError(
                f"The class embeddings are {tuple(weights.shape)} but the model embeds in "
                f"{model.config.projection_dim} dimensions; build the ZeroShotClassifier from this model."
            )
        config = copy.deepcopy(model.config)
        config.id2label = dict(enumerate(classifier.labels))
        config.label2id = {label: i for i, label in config.id2label.items()}
        param = next(model.parameters())
        head = cls(config).to(device=param.device, dtype=param.dtype)
        head.vision_model.load_state_dict(model.vision_model.state_dict())
        head.visual_projection.load_state_dict(model.visual_projection.state_dict())
        with torch.no_grad():
            head.classifier.weight.copy_(classifier.scale * weights.to(param.device, torch.float32))
            head.classifier.bias.fill_(classifier.logit_bias or 0.0)
        return head

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutput | tuple[Any, ...]:
        """Logits [batch, num_labels]; with `labels`, transformers' classification loss for the config's
        `problem_type` (cross-entropy for integer labels). A ViT's last block runs for the class token alone
        unless hidden states or attentions are asked for, which changes no logit."""
        hidden, attentions, as_dict = self._call_options(output_hidden_states, return_dict, kwargs)
        if pixel_values is None:
            raise ValueError("HfClipForImageClassification.forward needs pixel_values.")
        out = self.vision_model(
            pixel_values, interpolate_pos_encoding, hidden, pooled_only=True, output_attentions=attentions
        )
        logits = self.classifier(_normalize(self.visual_projection(out.pooler_output)))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return output if as_dict else output.to_tuple()


# Which Auto classes each model answers to; written into `auto_map` by save_pretrained.
_AUTO_CLASSES = {
    "HfClipModel": ("AutoModel", "AutoModelForZeroShotImageClassification"),
    "HfClipForImageClassification": ("AutoModelForImageClassification",),
    "HfClipTextModel": ("AutoModel",),
    "HfClipVisionModel": ("AutoModel",),
    "HfClipTextModelWithProjection": ("AutoModel",),
    "HfClipVisionModelWithProjection": ("AutoModel",),
}
# Auto classes that load a model's folder as another class: a CLIP folder starts an image classifier
# (`num_labels=...`), also with trust_remote_code=True where hf_clip is not installed to register it.
_LOADS_AS = {"HfClipModel": {"AutoModelForImageClassification": "HfClipForImageClassification"}}

__all__ = [
    "HfClipForImageClassification",
    "HfClipModel",
    "HfClipOutput",
    "HfClipPreTrainedModel",
    "HfClipTextModel",
    "HfClipTextModelWithProjection",
    "HfClipVisionModel",
    "HfClipVisionModelWithProjection",
    "contrastive_loss",
    "plain_torch_layers",
]
