"""The BoB field, mapped to today's timm names (params and dims with the head removed).

Names follow the paper's backbones; ``model`` is the timm ``arch.tag`` whose weights match
the paper's checkpoint most closely. Entries with ``model=None`` are in the study but have
no timm weights; those in ``_OFFICIAL`` load their official checkpoint file as downloaded
(``--weights FILE``), converted to a timm architecture by the named converter and evaluated
with the official linear evaluation's preprocessing. Entries in ``_RECIPES`` load timm's copy
of an official checkpoint whose timm config carries timm's generic recipe (crop 0.9) rather
than the one the weights were evaluated with; they get the official one.
"""

from __future__ import annotations

from bob_cache.backbones.registry import BackboneEntry, register_backbone

IN1K, IN21K = "ImageNet-1k", "ImageNet-21k"
_FB = "https://dl.fbaipublicfiles.com"
# Resize(256) + CenterCrop(224) with ImageNet statistics, as the official linear evaluations.
_EVAL_224 = {"crop_pct": 0.875, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_BILINEAR = {**_EVAL_224, "interpolation": "bilinear"}
_BICUBIC = {**_EVAL_224, "interpolation": "bicubic"}  # DINO's eval_linear.py
_CLIP = {"crop_pct": 1.0, "interpolation": "bicubic"}  # CLIP's Resize(n_px) + CenterCrop(n_px)

# fmt: off
_CATALOG = [
    # name, model, family, method, data, params, dim[, note]
    ("resnet50", "resnet50.tv_in1k", "ResNet", "supervised", IN1K, 23508032, 2048),
    ("resnet101", "resnet101.tv_in1k", "ResNet", "supervised", IN1K, 42500160, 2048),
    ("convnext_tiny_in1k", "convnext_tiny.fb_in1k", "ConvNeXt", "supervised", IN1K, 27820128, 768),
    ("convnext_small_in1k", "convnext_small.fb_in1k", "ConvNeXt", "supervised", IN1K, 49454688, 768),
    ("convnext_base_in1k", "convnext_base.fb_in1k", "ConvNeXt", "supervised", IN1K, 87566464, 1024),
    ("convnext_tiny_in22k", "convnext_tiny.fb_in22k", "ConvNeXt", "supervised", IN21K, 27820128, 768),
    ("convnext_small_in22k", "convnext_small.fb_in22k", "ConvNeXt", "supervised", IN21K, 49454688, 768),
    ("convnext_base_in22k", "convnext_base.fb_in22k", "ConvNeXt", "supervised", IN21K, 87566464, 1024),
    ("swinv2_tiny", "swinv2_tiny_window8_256.ms_in1k", "SwinV2", "supervised", IN1K, 27578154, 768),
    ("swinv2_small", "swinv2_small_window8_256.ms_in1k", "SwinV2", "supervised", IN1K, 48959418, 768),
    ("swinv2_base", "swinv2_base_window8_256.ms_in1k", "SwinV2", "supervised", IN1K, 86893816, 1024),
    ("swinv2_base_in22k", "swinv2_base_window12_192.ms_in22k", "SwinV2", "supervised", IN21K, 86893816, 1024),
    ("vit_small_in1k", "vit_small_patch16_224.augreg_in1k", "ViT", "supervised", IN1K, 21665664, 384),
    ("vit_small_in21k", "vit_small_patch16_224.augreg_in21k", "ViT", "supervised", IN21K, 21665664, 384),
    ("vit_base_in1k", "vit_base_patch16_224.augreg_in1k", "ViT", "supervised", IN1K, 85798656, 768),
    ("vit_base_in21k", "vit_base_patch16_224.augreg_in21k", "ViT", "supervised", IN21K, 85798656, 768),
    ("vit_large_in21k", "vit_large_patch16_224.augreg_in21k", "ViT", "supervised", IN21K, 303301632, 1024),
    ("efficientnet_b0", "efficientnet_b0.ra_in1k", "EfficientNet", "supervised", IN1K, 4007548, 1280),
    ("efficientnet_b4", "efficientnet_b4.ra2_in1k", "EfficientNet", "supervised", IN1K, 17548616, 1792),
    ("dino_vit_small", "vit_small_patch16_224.dino", "ViT", "DINO", IN1K, 21665664, 384),
    ("dino_vit_base", "vit_base_patch16_224.dino", "ViT", "DINO", IN1K, 85798656, 768),
    ("dino_resnet50", None, "ResNet", "DINO", IN1K, 23508032, 2048),
    ("mocov3_vit_small", None, "ViT", "MoCo v3", IN1K, 21665664, 384),
    ("mocov3_vit_base", None, "ViT", "MoCo v3", IN1K, 85798656, 768),
    ("mocov3_resnet50", None, "ResNet", "MoCo v3", IN1K, 23508032, 2048),
    ("mae_vit_base", "vit_base_patch16_224.mae", "ViT", "MAE", IN1K, 85798656, 768),
    ("vicreg_resnet50", None, "ResNet", "VICReg", IN1K, 23508032, 2048),
    ("vicregl_convnext_base", None, "ConvNeXt", "VICRegL", IN1K, 87566464, 1024),
    ("clip_vit_base_laion2b", "vit_base_patch16_clip_224.laion2b", "ViT", "CLIP", "LAION-2B", 85799424, 768),
    ("clip_vit_base_openai", "vit_base_patch16_clip_224.openai", "ViT", "CLIP", "WIT-400M (OpenAI)", 85799424, 768),
    ("clip_resnet50_openai", "resnet50_clip.openai", "ResNet", "CLIP", "WIT-400M (OpenAI)", 36218720, 2048),
    ("sam_vit_base", "samvit_base_patch16.sa1b", "ViT", "SAM", "SA-1B", 89670912, 256),
    ("midas_vit_large", None, "ViT", "MiDaS", "MIX-6 depth", 303690752, 1024),
    ("stable_diffusion_encoder", None, "U-Net encoder", "Stable Diffusion", "LAION-2B", 382876624, 1280),
    # Newer self-supervised models that users place against the BoB field.
    ("dinov2_vit_small", "vit_small_patch14_dinov2.lvd142m", "ViT", "DINOv2", "LVD-142M", 22056192, 384),
    ("dinov2_vit_base", "vit_base_patch14_dinov2.lvd142m", "ViT", "DINOv2", "LVD-142M", 86579712, 768),
    # Small models for laptops and quick looks.
    ("resnet18", "resnet18.tv_in1k", "ResNet", "supervised", IN1K, 11176512, 512),
    ("mobilenetv2", "mobilenetv2_100.ra_in1k", "MobileNetV2", "supervised", IN1K, 2223872, 1280),
]

# name → timm arch [+ options], converter, official file, its URL, preprocessing
_OFFICIAL = {
    "dino_resnet50": dict(
        arch="resnet50", converter="torchvision_resnet", data_config=_BICUBIC,
        checkpoint="dino_resnet50_pretrain.pth",
        source_url=f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
    ),
    "mocov3_vit_small": dict(  # MoCo v3's ViT-S has 12 heads (timm's vit_small has 6)
        arch="vit_small_patch16_224", arch_kwargs={"num_heads": 12}, converter="mocov3",
        data_config=_BILINEAR, checkpoint="vit-s-300ep.pth.tar",
        source_url=f"{_FB}/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar",
    ),
    "mocov3_vit_base": dict(
        arch="vit_base_patch16_224", converter="mocov3", data_config=_BILINEAR,
        checkpoint="vit-b-300ep.pth.tar",
        source_url=f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
    ),
    "mocov3_resnet50": dict(
        arch="resnet50", converter="mocov3", data_config=_BILINEAR,
        checkpoint="r-50-1000ep.pth.tar",
        source_url=f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
    ),
    "vicreg_resnet50": dict(
        arch="resnet50", converter="torchvision_resnet", data_config=_BILINEAR,
        checkpoint="resnet50.pth", source_url=f"{_FB}/vicreg/resnet50.pth",
    ),
    "vicregl_convnext_base": dict(  # VICRegL normalizes each position before pooling
        arch="convnext_base", arch_kwargs={"head_norm_first": True},
        converter="vicregl_convnext", data_config=_BILINEAR,
        checkpoint="convnext_base_alpha0.9.pth",
        source_url=f"{_FB}/vicregl/convnext_base_alpha0.9.pth",
    ),
    "midas_vit_large": dict(  # DPT-Large; timm's own vit_large_patch16_384 preprocessing
        arch="vit_large_patch16_384", converter="midas_dpt",
        checkpoint="dpt_large_384.pt",
        source_url="https://github.com/isl-org/MiDaS/releases/download/v3/dpt_large_384.pt",
    ),
    "stable_diffusion_encoder": dict(  # BoB's SDEncoder: VAE + U-Net encoder, prompt context
        provider="stable_diffusion", arch="sd_v1_encoder", converter="stable_diffusion_v1",
        checkpoint="sd-v1-4.ckpt",
        source_url="https://huggingface.co/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt",
    ),
}
# name → the official evaluation's preprocessing, over timm's generic config for the tag
_RECIPES = {
    "dino_vit_small": _BICUBIC,  # DINO's eval_linear.py: Resize(256, bicubic), CenterCrop(224)
    "dino_vit_base": _BICUBIC,
    "mae_vit_base": _BICUBIC,  # MAE's main_linprobe.py: Resize(256, bicubic), CenterCrop(224)
    "clip_vit_base_openai": _CLIP,
    "clip_resnet50_openai": _CLIP,
    # Swin's build_transform: Resize(int(256 / 224 * size), bicubic), CenterCrop(size)
    "swinv2_tiny": {"crop_pct": 0.875}, "swinv2_small": {"crop_pct": 0.875},
    "swinv2_base": {"crop_pct": 0.875}, "swinv2_base_in22k": {"crop_pct": 0.875},
}
# fmt: on


def _note(row: tuple) -> str:
    official = _OFFICIAL.get(row[0])
    if official is None:
        return row[7] if len(row) > 7 else ""
    return f"not in timm; --weights {official['checkpoint']} from {official['source_url']}"


for _row in _CATALOG:
    _extra = _OFFICIAL.get(_row[0]) or {"data_config": _RECIPES.get(_row[0], {})}
    register_backbone(BackboneEntry(*_row[:7], note=_note(_row), **_extra))
