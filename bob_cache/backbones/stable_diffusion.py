"""Stable Diffusion's encoder as the BoB study used it (registry name ``stable_diffusion_encoder``).

BoB's ``stable_diffusion_v1`` backbone (hsouri/bob-classification, ``models/stable_diff.py``)
passes an image through SD v1's VAE encoder (posterior mean, times 0.18215), then through the
U-Net's input blocks and middle block at timestep 0, cross-attending to the CLIP text encoding
of the prompt "image classification"; a GroupNorm at its initial (identity) affine and an
average over positions give the 1280-d feature. The modules below follow CompVis' LDM code
(``ldm/modules/diffusionmodules/{model,openaimodel}.py``, ``ldm/modules/attention.py``) and
keep the checkpoint's own key names, so the converter only selects keys; the CLIP text
encoder runs once, at load time, to turn the fixed prompt into the context. Unlike BoB's copy,
the U-Net's downsampling convolutions are loaded (BoB named them ``conv`` where the checkpoint
says ``op``, so they stayed random) and the VAE pads asymmetrically, as SD itself does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bob_cache.backbones.backbone import Backbone, Output, WeightsChoice
from bob_cache.backbones.converters import (
    StateDict,
    checkpoint_required,
    load_official_checkpoint,
    register_converter,
    select_keys,
)
from bob_cache.errors import SpecError, WeightsError

if TYPE_CHECKING:
    from bob_cache.backbones.registry import BackboneEntry

PROMPT = "image classification"
# CLIP BPE ids of <start> PROMPT <end> (open_clip's SimpleTokenizer, the same vocabulary as
# Hugging Face's CLIPTokenizer), padded with <end> to 77 as SD v1's FrozenCLIPEmbedder pads.
PROMPT_TOKENS = (49406, 2867, 26612, 49407)
SCALE_FACTOR = 0.18215  # SD v1's latent scale (v1-inference.yaml)


@dataclass(frozen=True)
class SDConfig:
    """Sizes of SD v1's VAE encoder, U-Net encoder and text context (v1-inference.yaml)."""

    vae_channels: int = 128
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)
    unet_channels: int = 320
    unet_mult: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2
    attention_ds: tuple[int, ...] = (4, 2, 1)
    heads: int = 8
    context_dim: int = 768
    context_length: int = 77
    latent_channels: int = 4
    image_size: int = 256  # BoB's sd_256_ft.yaml


SD_ARCHS: dict[str, SDConfig] = {"sd_v1_encoder": SDConfig()}


class GroupNorm32(nn.GroupNorm):
    """The U-Net's GroupNorm: computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> nn.GroupNorm:  # the VAE's and the transformers' Normalize
    return nn.GroupNorm(32, channels, eps=1e-6)


class VAEResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class VAEAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in "qkvo")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class VAEDownsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEEncoder(nn.Module):
    """``first_stage_model.encoder``: image → posterior moments (before ``quant_conv``)."""

    def __init__(self, cfg: SDConfig) -> None:
        super().__init__()
        cin = cfg.vae_channels
        self.conv_in = nn.Conv2d(3, cin, 3, padding=1)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.vae_mult):
            level, cout = nn.Module(), cfg.vae_channels * mult
            level.block = nn.ModuleList(
                VAEResBlock(cin if j == 0 else cout, cout) for j in range(cfg.res_blocks)
            )
            if i < len(cfg.vae_mult) - 1:
                level.downsample = VAEDownsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = VAEResBlock(cin, cin), VAEAttention(cin)
        self.mid.block_2 = VAEResBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner, self.heads = heads * dim_head, heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        block = TransformerBlock(channels, heads, channels // heads, context_dim)
        self.transformer_blocks = nn.ModuleList([block])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context)
        return self.proj_out(t.transpose(1, 2).reshape(b, c, h, w)) + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Step(nn.Sequential):
    """One ``TimestepEmbedSequential`` of the U-Net: layers that see the time and context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x) if isinstance(layer, nn.Conv2d) else layer(x, emb, context)
        return x


class UNetEncoder(nn.Module):
    """``model.diffusion_model``'s time embedding, input blocks and middle block."""

    def __init__(self, cfg: SDConfig) -> None:
        super().__init__()
        ch, emb = cfg.unet_channels, 4 * cfg.unet_channels
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(cfg.latent_channels, ch, 3, padding=1))])
        c, ds = ch, 1
        for level, mult in enumerate(cfg.unet_mult):
            for _ in range(cfg.res_blocks):
                layers: list[nn.Module] = [ResBlock(c, mult * ch, emb)]
                c = mult * ch
                if ds in cfg.attention_ds:
                    layers.append(SpatialTransformer(c, cfg.heads, cfg.context_dim))
                self.input_blocks.append(Step(*layers))
            if level < len(cfg.unet_mult) - 1:
                self.input_blocks.append(Step(Downsample(c)))
                ds *= 2
        self.middle_block = Step(
            ResBlock(c, c, emb),
            SpatialTransformer(c, cfg.heads, cfg.context_dim),
            ResBlock(c, c, emb),
        )
        self.out_channels = c


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """LDM's sinusoidal timestep embedding (``cos`` half first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SDEncoder(nn.Module):
    """Image → U-Net middle-block features, as in BoB's ``SDEncoder`` (timestep 0)."""

    def __init__(self, cfg: SDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.first_stage_model = nn.Module()
        self.first_stage_model.encoder = VAEEncoder(cfg)
        moments = 2 * cfg.latent_channels
        self.first_stage_model.quant_conv = nn.Conv2d(moments, moments, 1)
        self.diffusion_model = UNetEncoder(cfg)
        self.register_buffer("context", torch.randn(1, cfg.context_length, cfg.context_dim))
        self.num_features = self.diffusion_model.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vae, unet = self.first_stage_model, self.diffusion_model
        z = vae.quant_conv(vae.encoder(x))[:, : self.cfg.latent_channels] * SCALE_FACTOR
        t = timestep_embedding(torch.zeros(x.shape[0], device=x.device), self.cfg.unet_channels)
        emb = unet.time_embed(t.to(z.dtype))
        context = self.context.expand(x.shape[0], -1, -1).to(z.dtype)
        h = z
        for block in unet.input_blocks:
            h = block(h, emb, context)
        return unet.middle_block(h, emb, context)


class StableDiffusionBackbone(Backbone):
    """``final``: GroupNorm (32 groups, identity affine) of the middle block, averaged."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.model(x)
        return {"final": F.group_norm(h.float(), 32, eps=1e-5).mean((2, 3)).to(h.dtype)}


class StableDiffusionProvider:
    """Builds the SD encoder; reachable only through its registry entry (it needs the file)."""

    name = "stable_diffusion"

    def model_names(self) -> list[str]:
        return []

    def has_model(self, model: str) -> bool:
        return False

    def create(
        self,
        model: str,
        *,
        name: str,
        weights: WeightsChoice,
        layers: list[str],
        pool: str,
        image_size: int | None,
        official: BackboneEntry | None = None,
    ) -> StableDiffusionBackbone:
        if official is None or model not in SD_ARCHS:
            raise SpecError(f"Use --backbone stable_diffusion_encoder (got '{name}').")
        if list(layers) != ["final"] or pool != "default":
            raise SpecError(
                f"{name} gives one output: --layers final with --pool default (the U-Net middle "
                "block, group-normalized and averaged, as in BoB)."
            )
        if weights.kind == "pretrained":
            raise checkpoint_required(official)
        cfg = SD_ARCHS[model]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed or 0)
            net = SDEncoder(cfg)
        if weights.file is not None:
            load_official_checkpoint(net, weights.file, official)
        size = image_size or cfg.image_size
        data_config: dict[str, Any] = {
            "input_size": [3, size, size],
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],  # the VAE takes pixels in [-1, 1]
            "std": [0.5, 0.5, 0.5],
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
        return StableDiffusionBackbone(
            net,
            name=name,
            provider=self.name,
            arch=model,
            pretrained_tag=None,
            weights=weights,
            data_config=data_config,
            outputs=[Output("final", "head")],
            conversion={"converter": official.converter, "arch_kwargs": {"prompt": PROMPT}},
        )


_TEXT = "cond_stage_model.transformer.text_model."
_SCHEDULE = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "scale_factor",
]
_DROP = (
    "model.diffusion_model.output_blocks.",
    "model.diffusion_model.out.",
    "first_stage_model.decoder.",
    "first_stage_model.post_quant_conv.",
    "first_stage_model.loss.",
    "model_ema.",
)


@register_converter("stable_diffusion_v1")
def convert_stable_diffusion_v1(state: StateDict, expected: str) -> StateDict:
    """SD v1 (LDM) checkpoints: the VAE encoder and ``quant_conv`` as they are, the U-Net's
    time embedding, input and middle blocks (``model.diffusion_model.`` → ``diffusion_model.``),
    and the CLIP text encoder turned into ``context``, its encoding of BoB's prompt; the
    decoders, output blocks, EMA copy and noise schedule are dropped."""
    text = {k[len(_TEXT) :]: v for k, v in state.items() if k.startswith(_TEXT)}
    if "embeddings.token_embedding.weight" not in text:
        raise WeightsError(
            f"The weights file is not {expected}: it has no CLIP text encoder "
            f"'{_TEXT}*'. Pass the full SD v1 checkpoint with --weights."
        )
    rest = {k: v for k, v in state.items() if k not in _SCHEDULE and not k.startswith(_TEXT)}
    kept = select_keys(rest, keep="", drop=_DROP, expected=expected)
    out = {re.sub(r"^model\.diffusion_model\.", "diffusion_model.", k): v for k, v in kept.items()}
    out["context"] = encode_prompt(text)
    return out


def encode_prompt(weights: StateDict, tokens: tuple[int, ...] = PROMPT_TOKENS) -> torch.Tensor:
    """``(1, 77, width)``: the last hidden state of a Hugging Face ``CLIPTextModel`` (pre-norm
    layers, causal attention, quick GELU, final LayerNorm) for ``tokens``, from its weights."""
    w = {k: v.float() for k, v in weights.items()}
    length, width = w["embeddings.position_embedding.weight"].shape
    ids = torch.full((1, length), tokens[-1], dtype=torch.long)
    ids[0, : len(tokens)] = torch.tensor(tokens)
    x = w["embeddings.token_embedding.weight"][ids] + w["embeddings.position_embedding.weight"]
    causal = torch.full((length, length), float("-inf")).triu(1)
    heads = width // 64  # CLIP text encoders use 64-d heads

    def ln(t: torch.Tensor, key: str) -> torch.Tensor:
        return F.layer_norm(t, (width,), w[f"{key}.weight"], w[f"{key}.bias"], 1e-5)

    def lin(t: torch.Tensor, key: str) -> torch.Tensor:
        return F.linear(t, w[f"{key}.weight"], w[f"{key}.bias"])

    layers = sorted({int(m[1]) for k in w if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        p = f"encoder.layers.{i}."
        h = ln(x, p + "layer_norm1")
        q, k, v = (
            lin(h, f"{p}self_attn.{n}_proj").unflatten(-1, (heads, -1)).transpose(1, 2)
            for n in "qkv"
        )
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        x = x + lin(attn.transpose(1, 2).flatten(2), p + "self_attn.out_proj")
        h = lin(ln(x, p + "layer_norm2"), p + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), p + "mlp.fc2")
    return ln(x, "final_layer_norm")
