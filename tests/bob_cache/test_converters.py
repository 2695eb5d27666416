"""Official checkpoints of the BoB field load through their registry entry's converter.

Each test writes a synthetic checkpoint in the official file's key layout (a random-init timm
model renamed the inverse way, plus the extras the official file carries: MoCo's momentum
encoder and predictor, DPT's decoder, ...), wrapped as the official file is wrapped, then
loads it through ``create_backbone(name, weights=path)`` and checks every tensor.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from bob_cache.backbones import create_backbone, get_backbone_entry, list_backbones, registry
from bob_cache.backbones.converters import get_converter, list_converters, register_converter
from bob_cache.backbones.registry import BackboneEntry
from bob_cache.backbones.stable_diffusion import SD_ARCHS, SDConfig, SDEncoder
from bob_cache.errors import (
    BackboneUnavailableError,
    CheckpointRequiredError,
    SpecError,
    WeightsError,
)

StateDict = dict[str, torch.Tensor]
OFFICIAL = [e.name for e in list_backbones() if e.needs_checkpoint]


def reference_model(entry: BackboneEntry, *, seed: int = 1) -> torch.nn.Module:
    """The target architecture with random parameters and buffers (BN statistics included)."""
    torch.manual_seed(seed)
    model = timm.create_model(entry.arch, pretrained=False, num_classes=0, **entry.arch_kwargs)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                tensor.normal_()
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(1234)
            elif name.endswith(".gamma") and entry.converter == "vicregl_convnext":
                tensor.fill_(1.0)  # VICRegL trains without layer scale
    return model.eval()


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _mocov3_file(state: StateDict, entry: BackboneEntry) -> dict:
    dim = entry.feature_dim
    projector = "head" if entry.family == "ViT" else "fc"
    extras = {
        f"module.base_encoder.{projector}.0.weight": _randn(4096, dim),
        f"module.base_encoder.{projector}.1.running_mean": _randn(4096),
        **{f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()},
        f"module.momentum_encoder.{projector}.0.weight": _randn(4096, dim),
        "module.predictor.0.weight": _randn(4096, 256),
        "module.predictor.4.running_var": _randn(256),
    }
    encoder = {f"module.base_encoder.{k}": v for k, v in state.items()}
    return {
        "epoch": 300,
        "arch": entry.arch,
        "state_dict": {**encoder, **extras},
        "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 0.1}]},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
    }


def _midas_file(state: StateDict, entry: BackboneEntry) -> dict:
    dim = entry.feature_dim
    return {
        **{f"pretrained.model.{k}": v for k, v in state.items()},
        "pretrained.model.head.weight": _randn(1000, dim),
        "pretrained.model.head.bias": _randn(1000),
        "pretrained.act_postprocess1.0.project.0.weight": _randn(dim, 2 * dim),
        "pretrained.act_postprocess1.3.weight": _randn(256, dim, 1, 1),
        "pretrained.act_postprocess4.4.bias": _randn(1024),
        "scratch.layer1_rn.weight": _randn(256, 256, 3, 3),
        "scratch.refinenet4.resConfUnit1.conv1.weight": _randn(256, 256, 3, 3),
        "scratch.output_conv.4.bias": _randn(1),
    }


_INVERSE_CONVNEXT = (
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc(\d)\.", r".pwconv\1."),
    (r"^norm_pre\.", "norm."),
)


def _vicregl_file(state: StateDict, entry: BackboneEntry) -> dict:
    out = {}
    for key, value in state.items():
        if key.endswith(".gamma"):
            continue  # VICRegL's ConvNeXt has no layer scale
        for pattern, repl in _INVERSE_CONVNEXT:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


OFFICIAL_LAYOUT: dict[str, Callable[[StateDict, BackboneEntry], dict]] = {
    "torchvision_resnet": lambda state, entry: dict(state),
    "mocov3": _mocov3_file,
    "midas_dpt": _midas_file,
    "vicregl_convnext": _vicregl_file,
}


def write_official(entry: BackboneEntry, path: Path, *, seed: int = 1) -> StateDict:
    """Save a synthetic official checkpoint for ``entry``; returns the timm state it encodes."""
    state = {k: v.clone() for k, v in reference_model(entry, seed=seed).state_dict().items()}
    torch.save(OFFICIAL_LAYOUT[entry.converter](state, entry), path)
    return state


def assert_loads_exactly(name: str, tmp_path: Path) -> None:
    entry = get_backbone_entry(name)
    path = tmp_path / entry.checkpoint
    expected = write_official(entry, path)
    bb = create_backbone(name, weights=path)
    loaded = bb.model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert bb.output_dims() == {"final": entry.feature_dim}
    assert bb.num_params() == entry.params
    assert bb.identity()["conversion"]["converter"] == entry.converter
    assert bb.identity()["weights"]["kind"] == "file"


def test_every_entry_without_timm_weights_has_a_converter() -> None:
    assert {e.name for e in list_backbones() if not e.available} == set(OFFICIAL)
    assert set(OFFICIAL) == {
        "dino_resnet50",
        "mocov3_vit_small",
        "mocov3_vit_base",
        "mocov3_resnet50",
        "vicreg_resnet50",
        "vicregl_convnext_base",
        "midas_vit_large",
        "stable_diffusion_encoder",
    }
    for name in OFFICIAL:
        entry = get_backbone_entry(name)
        assert entry.converter in list_converters()
        assert entry.source_url.startswith("https://") and entry.source_url.endswith(
            entry.checkpoint
        )
        assert entry.source_url in entry.note and "not in timm" in entry.note


@pytest.mark.parametrize(
    "name", ["dino_resnet50", "vicreg_resnet50", "mocov3_resnet50", "mocov3_vit_small"]
)
def test_official_checkpoint_loads_exactly(name: str, tmp_path: Path) -> None:
    assert_loads_exactly(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mocov3_vit_base", "vicregl_convnext_base", "midas_vit_large"])
def test_official_checkpoint_loads_exactly_full_size(name: str, tmp_path: Path) -> None:
    assert_loads_exactly(name, tmp_path)


def _shrunk(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> BackboneEntry:
    """Point registry entry ``name`` at a smaller architecture of the same family."""
    registry._ensure_catalog()
    small = dataclasses.replace(registry.BACKBONES.get(name), **changes)
    monkeypatch.setattr(registry, "BACKBONES", registry.BACKBONES.copy())
    return registry.BACKBONES.register(name, small, override=True)


def test_midas_dpt_checkpoint_loads_exactly_small_stand_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _shrunk(
        monkeypatch,
        "midas_vit_large",
        arch="vit_small_patch16_384",
        feature_dim=384,
        params=sum(
            p.numel()
            for p in timm.create_model("vit_small_patch16_384", num_classes=0).parameters()
        ),
    )
    assert_loads_exactly("midas_vit_large", tmp_path)


def test_vicregl_convnext_loads_exactly_and_pools_as_vicregl(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Small stand-in (convnext_atto, same layout); VICRegL's feature is the mean over
    positions of the per-position LayerNorm of the last stage."""
    atto = timm.create_model("convnext_atto", num_classes=0)
    entry = _shrunk(
        monkeypatch,
        "vicregl_convnext_base",
        arch="convnext_atto",
        feature_dim=320,
        params=sum(p.numel() for p in atto.parameters()),
    )
    assert_loads_exactly("vicregl_convnext_base", tmp_path)
    bb = create_backbone("vicregl_convnext_base", weights=tmp_path / entry.checkpoint)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        net = bb.model
        tokens = net.stages(net.stem(x)).flatten(2).transpose(1, 2)
        norm = torch.nn.functional.layer_norm(
            tokens, (320,), net.norm_pre.weight, net.norm_pre.bias, eps=1e-6
        )
        assert torch.allclose(bb(x)["final"], norm.mean(1), atol=1e-5)


def test_mocov3_vit_small_has_twelve_heads_and_the_official_preprocessing(tmp_path: Path) -> None:
    bb = create_backbone("mocov3_vit_small", random_init=True)
    assert {blk.attn.num_heads for blk in bb.model.blocks} == {12}
    assert bb.data_config["interpolation"] == "bilinear"
    assert bb.data_config["crop_pct"] == 0.875
    assert bb.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert bb.identity()["conversion"] == {"converter": "mocov3", "arch_kwargs": {"num_heads": 12}}


def test_no_weights_names_the_official_download() -> None:
    entry = get_backbone_entry("dino_resnet50")
    with pytest.raises(CheckpointRequiredError) as info:
        create_backbone("dino_resnet50")
    message = str(info.value)
    assert entry.source_url in message and "--weights FILE" in message
    assert message.startswith("dino_resnet50 has no timm weights; download the official")
    assert isinstance(info.value, WeightsError) and isinstance(info.value, BackboneUnavailableError)


def test_wrong_file_names_the_expected_checkpoint(tmp_path: Path) -> None:
    dino = tmp_path / "dino_resnet50_pretrain.pth"
    write_official(get_backbone_entry("dino_resnet50"), dino)
    with pytest.raises(WeightsError, match=r"no keys starting with 'module\.base_encoder\.'") as e:
        create_backbone("mocov3_resnet50", weights=dino)
    assert "r-50-1000ep.pth.tar" in str(e.value) and "--weights" in str(e.value)
    with pytest.raises(WeightsError, match=r"convnext_base_alpha0\.9\.pth .*no ConvNeXt stem"):
        create_backbone("vicregl_convnext_base", weights=dino)


def test_missing_and_extra_keys_fail_loudly(tmp_path: Path) -> None:
    entry = get_backbone_entry("dino_resnet50")
    state = reference_model(entry).state_dict()
    supervised = {**state, "fc.weight": _randn(1000, 2048), "fc.bias": _randn(1000)}
    torch.save(supervised, tmp_path / "tv.pth")
    with pytest.raises(WeightsError, match=r"unexpected \(2\): fc\.weight, fc\.bias") as e:
        create_backbone("dino_resnet50", weights=tmp_path / "tv.pth")
    assert "dino_resnet50_pretrain.pth" in str(e.value) and entry.source_url in str(e.value)
    del state["layer4.2.bn3.running_var"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"missing \(1\): layer4\.2\.bn3\.running_var"):
        create_backbone("vicreg_resnet50", weights=tmp_path / "cut.pth")


def test_mocov3_stray_keys_and_wrong_size_fail(tmp_path: Path) -> None:
    small = get_backbone_entry("mocov3_vit_small")
    ckpt = _mocov3_file(reference_model(small).state_dict(), small)
    ckpt["state_dict"]["module.queue"] = _randn(256, 10)
    torch.save(ckpt, tmp_path / "stray.pth.tar")
    with pytest.raises(
        WeightsError, match=r"neither under 'module\.base_encoder\.'.*module\.queue"
    ):
        create_backbone("mocov3_vit_small", weights=tmp_path / "stray.pth.tar")
    del ckpt["state_dict"]["module.queue"]
    torch.save(ckpt, tmp_path / "vit-s-300ep.pth.tar")
    with pytest.raises(WeightsError, match=r"wrong shape .*vit-b-300ep\.pth\.tar"):
        create_backbone("mocov3_vit_base", weights=tmp_path / "vit-s-300ep.pth.tar")


def test_converter_registry() -> None:
    assert {"torchvision_resnet", "mocov3", "midas_dpt", "vicregl_convnext"} <= set(
        list_converters()
    )
    with pytest.raises(ValueError, match="already registered"):
        register_converter("mocov3")(lambda state, expected: state)
    with pytest.raises(KeyError, match="No checkpoint converter 'nope'"):
        get_converter("nope")


def test_backbones_listing_shows_the_download(cli) -> None:
    out = cli("backbones", "--method", "MoCo v3").stdout
    assert "vit-b-300ep.pth.tar" in out and "dl.fbaipublicfiles.com/moco-v3" in out


# --- Stable Diffusion: LDM checkpoint (sd-v1-4.ckpt) → VAE encoder + U-Net encoder + context

TINY_SD = SDConfig(
    vae_channels=32,
    vae_mult=(1, 2),
    unet_channels=32,
    unet_mult=(1, 2),
    res_blocks=1,
    attention_ds=(1,),
    heads=2,
    context_dim=64,
    image_size=64,
)


def _clip_text(width: int, layers: int) -> StateDict:
    """A random CLIP text encoder in Hugging Face's layout (as SD checkpoints hold it)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    text = {
        "embeddings.token_embedding.weight": r(49408, width),
        "embeddings.position_embedding.weight": r(77, width),
        "embeddings.position_ids": torch.arange(77)[None],
        "final_layer_norm.weight": 1 + r(width),
        "final_layer_norm.bias": r(width),
    }
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            text[f"{p}self_attn.{n}_proj.weight"] = r(width, width)
            text[f"{p}self_attn.{n}_proj.bias"] = r(width)
        for n in ("layer_norm1", "layer_norm2"):
            text[f"{p}{n}.weight"], text[f"{p}{n}.bias"] = 1 + r(width), r(width)
        text[f"{p}mlp.fc1.weight"], text[f"{p}mlp.fc1.bias"] = r(4 * width, width), r(4 * width)
        text[f"{p}mlp.fc2.weight"], text[f"{p}mlp.fc2.bias"] = r(width, 4 * width), r(width)
    return text


def _first_token_context(text: StateDict, width: int) -> torch.Tensor:
    """Position 0 of the context, by hand: causal attention over one token is its value."""
    x = (
        text["embeddings.token_embedding.weight"][49406]
        + text["embeddings.position_embedding.weight"][0]
    )

    def ln(t: torch.Tensor, key: str) -> torch.Tensor:
        mean, var = t.mean(), t.var(unbiased=False)
        return (t - mean) / torch.sqrt(var + 1e-5) * text[f"{key}.weight"] + text[f"{key}.bias"]

    def lin(t: torch.Tensor, key: str) -> torch.Tensor:
        return text[f"{key}.weight"] @ t + text[f"{key}.bias"]

    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in text:
        p = f"encoder.layers.{i}."
        x = x + lin(lin(ln(x, p + "layer_norm1"), p + "self_attn.v_proj"), p + "self_attn.out_proj")
        h = lin(ln(x, p + "layer_norm2"), p + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), p + "mlp.fc2")
        i += 1
    return ln(x, "final_layer_norm")


@pytest.fixture
def lightning_name(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class pickled under PyTorch Lightning's ModelCheckpoint name, as in sd-v1-4.ckpt."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)
    cls = type("ModelCheckpoint", (), {"__module__": name})
    module.ModelCheckpoint = cls
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, part, types.ModuleType(part))
    monkeypatch.setitem(sys.modules, name, module)
    return cls


def write_sd_checkpoint(
    cfg: SDConfig, path: Path, callback_key: type
) -> tuple[StateDict, StateDict]:
    """A synthetic LDM checkpoint; returns (expected backbone state, CLIP text weights)."""
    torch.manual_seed(5)
    net = SDEncoder(cfg)
    state = {k: v.clone() for k, v in net.state_dict().items() if k != "context"}
    ldm = {re.sub(r"^diffusion_model\.", "model.diffusion_model.", k): v for k, v in state.items()}
    text = _clip_text(cfg.context_dim, layers=2)
    extras = {
        "betas": torch.rand(1000),
        "alphas_cumprod": torch.rand(1000),
        "posterior_mean_coef2": torch.rand(1000),
        "first_stage_model.decoder.conv_in.weight": _randn(512, 4, 3, 3),
        "first_stage_model.post_quant_conv.weight": _randn(4, 4, 1, 1),
        "model.diffusion_model.output_blocks.0.0.in_layers.0.weight": _randn(64),
        "model.diffusion_model.out.2.weight": _randn(4, 32, 3, 3),
        "model_ema.decay": torch.tensor(0.9999),
        **{f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()},
    }
    torch.save(
        {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": {**ldm, **extras},
            "callbacks": {callback_key: {"best_model_score": None, "best_model_path": ""}},
        },
        path,
    )
    return state, text


def assert_sd_loads_exactly(cfg: SDConfig, tmp_path: Path, callback_key: type) -> None:
    entry = get_backbone_entry("stable_diffusion_encoder")
    path = tmp_path / entry.checkpoint
    expected, text = write_sd_checkpoint(cfg, path, callback_key)
    for name in [n for n in sys.modules if n.startswith("pytorch_lightning")]:
        del sys.modules[name]  # loading must not need the class
    bb = create_backbone("stable_diffusion_encoder", weights=path)
    loaded = bb.model.state_dict()
    assert loaded.keys() == {*expected, "context"}
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    context = loaded["context"]
    assert context.shape == (1, 77, cfg.context_dim)
    assert torch.allclose(context[0, 0], _first_token_context(text, cfg.context_dim), atol=1e-5)
    assert not torch.allclose(context[0, 1], context[0, 2])  # the prompt's tokens differ
    assert bb.output_dims() == {"final": entry.feature_dim}
    assert bb.identity()["conversion"]["converter"] == "stable_diffusion_v1"
    assert bb.data_config["mean"] == [0.5, 0.5, 0.5]


def test_stable_diffusion_checkpoint_loads_exactly_small_stand_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lightning_name: type
) -> None:
    monkeypatch.setitem(SD_ARCHS, "sd_tiny", TINY_SD)
    _shrunk(monkeypatch, "stable_diffusion_encoder", arch="sd_tiny", feature_dim=64)
    assert_sd_loads_exactly(TINY_SD, tmp_path, lightning_name)


@pytest.mark.slow
def test_stable_diffusion_checkpoint_loads_exactly_full_size(
    tmp_path: Path, lightning_name: type
) -> None:
    assert_sd_loads_exactly(SD_ARCHS["sd_v1_encoder"], tmp_path, lightning_name)


def test_stable_diffusion_entry_matches_its_architecture_and_refuses_other_files(
    tmp_path: Path,
) -> None:
    entry = get_backbone_entry("stable_diffusion_encoder")
    with torch.device("meta"):
        net = SDEncoder(SD_ARCHS[entry.arch])
    assert (sum(p.numel() for p in net.parameters()), net.num_features) == (
        entry.params,
        entry.feature_dim,
    )
    with pytest.raises(CheckpointRequiredError, match="sd-v1-4.ckpt"):
        create_backbone("stable_diffusion_encoder")
    dino = tmp_path / "dino.pth"
    write_official(get_backbone_entry("dino_resnet50"), dino)
    with pytest.raises(WeightsError, match="no CLIP text encoder"):
        create_backbone("stable_diffusion_encoder", weights=dino)
    with pytest.raises(SpecError, match="--layers final"):
        create_backbone("stable_diffusion_encoder", weights=dino, layers=["final", "-2"])


def test_extract_through_the_cli_with_the_official_file(
    cli, tmp_path: Path, image_folder: Path
) -> None:
    store = tmp_path / "store"
    args = ["extract", "--data", image_folder, "--backbone", "dino_resnet50", "--store", store]
    missing = cli(*args, "-q")
    assert missing.exit_code == 1
    assert "dino_resnet50_pretrain.pth" in missing.output and "--weights FILE" in missing.output
    path = tmp_path / "dino_resnet50_pretrain.pth"
    write_official(get_backbone_entry("dino_resnet50"), path)
    done = cli(*args, "--weights", path, "--image-size", "64", "--workers", "0", "-q")
    assert done.exit_code == 0, done.output
    listing = cli("ls", store, "--json").stdout
    assert "resnet50.file-" in listing
