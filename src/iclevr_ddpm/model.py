"""The denoising network: diffusers' UNet2DModel plus a learned multi-hot label
projection. It knows nothing of diffusion: (noisy image, timestep, labels) -> output."""
from __future__ import annotations

import contextlib

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import check_choice
from .errors import UserError
from .labels import COLORS, NAMES, NUM_LABELS, SHAPES

# Named architectures (nanoGPT-style presets); params.yaml picks one and may override fields.
_CPU = dict(resolution=32, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
PRESETS = {
    # Tests: a few thousand parameters, 16x16.
    "tiny": dict(resolution=16, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8),
    # 4.5M parameters at 32x32 (AdaGN conditioning), attention at 8x8 (~90 images/s on 2 cores).
    "cpu": _CPU,
    # The CPU default: the same UNet on 64x64 images folded into 2x2 patches (32x32x12),
    # 64x64 detail at about the `cpu` cost (docs/image-quality.md).
    "cpu_patch": {**_CPU, "resolution": 64, "patch_size": 2},
    # Latent diffusion on the CPU (model.space: latent): the 16x16 latents of the autoencoder,
    # widths of the `cpu` preset's 16/8/4 levels, attention at 8x8.
    "cpu_latent": dict(resolution=16, block_out_channels=(64, 128, 128), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # The reports' GPU model: ~114M parameters at 64x64, attention at 4x4.
    "report": dict(resolution=64, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                   down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
}
# How the multi-hot labels reach the network (the seed reports compare these):
#   embedding    Linear(labels) added to the time embedding, which each ResNet block adds to its features
#   scale_shift  the same embedding, applied as AdaGN: GroupNorm(h) * (1 + scale) + shift (Dhariwal & Nichol 2021)
#   concat       the 24 label values as constant extra input channels
#   none         no label input (ablation)
#   cross_attention  scale_shift, and the attention levels' blocks also attend to one token per
#                present object plus a null token (UNet2DConditionModel): each pixel can look up
#                which object it belongs to, where AdaGN gives every pixel the same sum of them
CONDITIONING = ("embedding", "scale_shift", "concat", "none", "cross_attention")
# What the label projection reads (embedding / scale_shift):
#   objects     the 24-dim multi-hot vector: one learnt direction per object
#   attributes  the multi-hot vector plus its colour and shape counts (8 + 3): directions shared
#               by every object of a colour or shape, so "cube" learns from all 8 cube labels
LABEL_FEATURES = ("objects", "attributes")
# Where diffusion runs: on the (resized) pixels, or on the autoencoder's latents (autoencoder.py)
SPACES = ("pixel", "latent")


def model_kwargs(params: dict) -> dict:
    """Constructor kwargs from the `model` params: a preset plus overrides (`space` is not one:
    see model_space)."""
    params = dict(params)
    params.pop("space", None)
    preset = params.pop("preset", "cpu")
    check_choice("model.preset", preset, PRESETS)
    kw = {**PRESETS[preset], **params}
    check_choice("model.conditioning", kw.get("conditioning", "embedding"), CONDITIONING)
    check_choice("model.label_features", kw.get("label_features", "objects"), LABEL_FEATURES)
    return kw


def attribute_matrix() -> torch.Tensor:
    """(24, 11) 0/1: row i one-hot in label i's colour (first 8 columns, labels.COLORS order)
    and its shape (last 3, labels.SHAPES order); labels @ A = colour and shape counts."""
    m = torch.zeros(NUM_LABELS, len(COLORS) + len(SHAPES))
    for i, name in enumerate(NAMES):  # "<colour> <shape>"
        colour, shape = name.split()
        m[i, COLORS.index(colour)] = m[i, len(COLORS) + SHAPES.index(shape)] = 1
    return m


def _cross_attention_blocks(block_types) -> tuple:
    """UNet2DModel block names -> UNet2DConditionModel's: attention blocks gain cross-attention."""
    return tuple(b.replace("Attn", "CrossAttn") for b in block_types)


def model_space(params: dict) -> str:
    """`model.space` of the params: pixel (default) or latent."""
    space = params.get("space", "pixel")
    check_choice("model.space", space, SPACES)
    return space


class ConditionalUNet(ModelMixin, ConfigMixin):
    """UNet2DModel conditioned on multi-hot labels in one of the CONDITIONING ways.

    forward(x (B, C, R, R), t (B,) int, labels (B, 24) in {0, 1}) -> (B, C, R, R); C = in_channels,
    3 for pixels in [-1, 1], the autoencoder's latent channels for scaled latents.
    An all-zero label vector is the unconditional (dropped) condition.
    patch_size p > 1: the UNet runs on (B, C*p*p, R/p, R/p), each p x p patch folded into
    channels (pixel_unshuffle; "simple diffusion", Hoogeboom et al. 2023): R x R detail at the
    cost of an R/p UNet, with no autoencoder to train.
    label_features "attributes": the label projection reads (B, 24 + 8 + 3), the labels and their
    colour and shape counts (labels @ attribute_matrix()), a fixed matrix rebuilt from the config.
    self_condition: forward also takes x_self_cond (B, C, R, R), an earlier estimate of the clean
    input (zeros when there is none), as extra input channels (Chen et al. 2023, "Analog Bits").
    """

    @register_to_config
    def __init__(self, resolution: int = 32, block_out_channels=(32, 64, 128, 128), layers_per_block: int = 1,
                 down_block_types=PRESETS["cpu"]["down_block_types"],
                 up_block_types=PRESETS["cpu"]["up_block_types"], dropout: float = 0.0,
                 norm_num_groups: int = 32, conditioning: str = "embedding", num_labels: int = NUM_LABELS,
                 in_channels: int = 3, patch_size: int = 1, label_features: str = "objects",
                 self_condition: bool = False):
        super().__init__()
        check_choice("model.conditioning", conditioning, CONDITIONING)
        check_choice("model.label_features", label_features, LABEL_FEATURES)
        if patch_size < 1 or resolution % patch_size:
            raise UserError(f"params.yaml: model.patch_size is {patch_size}; expected a whole divisor "
                            f"of model.resolution ({resolution})")
        folded = in_channels * patch_size ** 2
        embed = conditioning in ("embedding", "scale_shift", "cross_attention")
        self.concat = conditioning == "concat"
        time_dim = block_out_channels[0] * 4  # UNet2DModel's time-embedding width
        inputs = folded * (2 if self_condition else 1) + (num_labels if self.concat else 0)
        unet = dict(sample_size=resolution // patch_size, in_channels=inputs,
                    out_channels=folded, block_out_channels=tuple(block_out_channels),
                    layers_per_block=layers_per_block, dropout=dropout, norm_num_groups=norm_num_groups,
                    resnet_time_scale_shift="default" if conditioning in ("embedding", "concat", "none")
                    else "scale_shift", class_embed_type="identity" if embed else None)
        if conditioning == "cross_attention":
            self.unet = UNet2DConditionModel(
                **unet, down_block_types=_cross_attention_blocks(down_block_types),
                up_block_types=_cross_attention_blocks(up_block_types),
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=time_dim)
            # token i: label i's own vector (+ its colour's and shape's, `attributes`); token 24: null
            self.label_tokens = nn.Embedding(num_labels + 1, time_dim)
        else:
            self.unet = UNet2DModel(**unet, down_block_types=tuple(down_block_types),
                                    up_block_types=tuple(up_block_types))
            self.label_tokens = None
        attrs = embed and label_features == "attributes"
        # labels (B, 24) -> [labels, labels @ A] (B, 35): colour and shape counts (attribute_matrix)
        self.register_buffer("attributes", attribute_matrix() if attrs else None, persistent=False)
        n_in = num_labels + (self.attributes.shape[1] if attrs else 0)
        self.label_proj = nn.Linear(n_in, time_dim) if embed else None
        self.attribute_tokens = (nn.Linear(self.attributes.shape[1], time_dim, bias=False)
                                 if attrs and self.label_tokens is not None else None)

    def _tokens(self, labels: torch.Tensor) -> dict:
        """Cross-attention inputs for labels (B, 24) in {0, 1}: the 25 tokens (B, 25, D) and a mask
        (B, 25) that keeps the present objects' tokens and the null token (all a dropped label sees)."""
        tokens = self.label_tokens.weight
        if self.attribute_tokens is not None:  # colour and shape directions shared across labels
            tokens = tokens + nn.functional.pad(self.attribute_tokens(self.attributes), (0, 0, 0, 1))
        keep = torch.cat([labels > 0, labels.new_ones(len(labels), 1, dtype=torch.bool)], dim=1)
        return dict(encoder_hidden_states=tokens.expand(len(labels), -1, -1), encoder_attention_mask=keep)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                x_self_cond: torch.Tensor | None = None) -> torch.Tensor:
        labels = labels.to(x.dtype)
        if self.config.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x_self_cond is None else x_self_cond.to(x.dtype)], dim=1)
        elif x_self_cond is not None:
            raise ValueError("x_self_cond given to a model built without self_condition")
        x = nn.functional.pixel_unshuffle(x, self.config.patch_size)  # identity for patch 1
        if self.concat:
            x = torch.cat([x, labels[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)
        cross = self._tokens(labels) if self.label_tokens is not None else {}
        if self.attributes is not None:
            labels = torch.cat([labels, labels @ self.attributes.to(labels.dtype)], dim=1)
        cond = self.label_proj(labels) if self.label_proj is not None else None
        out = self.unet(x, t, class_labels=cond, **cross).sample
        return nn.functional.pixel_shuffle(out, self.config.patch_size)


def exact_attention(device: torch.device):
    """Context for a training forward pass on `device`: on the CPU, attention by torch's math
    kernel. The fused CPU kernel that torch picks otherwise returns gradients whose error grows
    with the attention logits (pytorch/pytorch#133671): against float64, 2e-3 of the gradient at
    q, k ~ 100 and 0.24-0.54 at ~1000, where the math kernel stays near 1e-7. The mid block's
    activations reach that size late in a run at lr 2e-3, and its fp32 gradient norm then read
    7e7 and inf where float64 and the math kernel both read 0.017 (docs/image-quality.md).
    At 4x4 and 8x8 tokens the math kernel costs nothing measurable."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
