"""The BoB field, mapped to today's timm names (params and dims with the head removed).

Names follow the paper's backbones; ``model`` is the timm ``arch.tag`` whose weights match
the paper's checkpoint most closely. Entries with ``model=None`` are in the study but have
no timm weights: convert their checkpoint and pass it with ``--weights``.
"""

from __future__ import annotations

from bob_cache.backbones.registry import BackboneEntry, register_backbone

IN1K, IN21K = "ImageNet-1k", "ImageNet-21k"
_MISSING = "not in timm; convert the checkpoint and use --weights"

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
    ("dino_resnet50", None, "ResNet", "DINO", IN1K, 23508032, 2048, _MISSING),
    ("mocov3_vit_small", None, "ViT", "MoCo v3", IN1K, 21665664, 384, _MISSING),
    ("mocov3_vit_base", None, "ViT", "MoCo v3", IN1K, 85798656, 768, _MISSING),
    ("mocov3_resnet50", None, "ResNet", "MoCo v3", IN1K, 23508032, 2048, _MISSING),
    ("mae_vit_base", "vit_base_patch16_224.mae", "ViT", "MAE", IN1K, 85798656, 768),
    ("vicreg_resnet50", None, "ResNet", "VICReg", IN1K, 23508032, 2048, _MISSING),
    ("vicregl_convnext_base", None, "ConvNeXt", "VICRegL", IN1K, 87566464, 1024, _MISSING),
    ("clip_vit_base_laion2b", "vit_base_patch16_clip_224.laion2b", "ViT", "CLIP", "LAION-2B", 85799424, 768),
    ("clip_vit_base_openai", "vit_base_patch16_clip_224.openai", "ViT", "CLIP", "WIT-400M (OpenAI)", 85799424, 768),
    ("clip_resnet50_openai", "resnet50_clip.openai", "ResNet", "CLIP", "WIT-400M (OpenAI)", 36218720, 2048),
    ("sam_vit_base", "samvit_base_patch16.sa1b", "ViT", "SAM", "SA-1B", 89670912, 256),
    ("midas_vit_large", None, "ViT", "MiDaS", "MIX-6 depth", None, 1024, _MISSING),
    ("stable_diffusion_encoder", None, "U-Net encoder", "Stable Diffusion", "LAION-2B", None, None, _MISSING),
    # Newer self-supervised models that users place against the BoB field.
    ("dinov2_vit_small", "vit_small_patch14_dinov2.lvd142m", "ViT", "DINOv2", "LVD-142M", 22056192, 384),
    ("dinov2_vit_base", "vit_base_patch14_dinov2.lvd142m", "ViT", "DINOv2", "LVD-142M", 86579712, 768),
    # Small models for laptops and quick looks.
    ("resnet18", "resnet18.tv_in1k", "ResNet", "supervised", IN1K, 11176512, 512),
    ("mobilenetv2", "mobilenetv2_100.ra_in1k", "MobileNetV2", "supervised", IN1K, 2223872, 1280),
]
# fmt: on

for _row in _CATALOG:
    register_backbone(BackboneEntry(*_row[:7], note=_row[7] if len(_row) > 7 else ""))
