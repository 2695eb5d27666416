"""The networks and the optimizer of the fine-tuning stage: pyramids of every backbone family,
the detector's proposal budgets, layer-wise learning rates and the warm-up cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
from torch import nn

from bob_cache.errors import SpecError
from bob_cache.finetune.models import Classifier, SemanticFPN, create_detector, proposal_budgets
from bob_cache.finetune.optim import create_optimizer, create_scheduler, resolve_layer_decay
from bob_cache.finetune.pyramid import PyramidBody


def _net(name: str) -> nn.Module:
    if name.startswith("tv:"):
        import torchvision

        return torchvision.models.get_model(name[3:], weights=None)
    kwargs = {"img_size": 64} if "vit" in name else {}
    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit", "tv:resnet18"])
def test_pyramid_gives_strides_4_to_32(name: str) -> None:
    body = PyramidBody(_net(name), name=name)
    maps = body(torch.zeros(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "3"]
    assert [m.shape[-1] for m in maps.values()] == [16, 8, 4, 2]
    assert [m.shape[1] for m in maps.values()] == body.in_channels


def test_plain_vit_gets_a_simple_pyramid() -> None:
    body = PyramidBody(_net("test_vit"), name="test_vit")
    assert body.simple is not None and body.stages.plain


def test_a_model_without_stages_names_the_families() -> None:
    with pytest.raises(SpecError, match=r"cannot give a feature pyramid.*plain ViTs.*Fix: pick"):
        PyramidBody(nn.Linear(3, 3), name="linear")


def test_frozen_body_keeps_weights_and_statistics() -> None:
    body = PyramidBody(_net("test_resnet"), name="test_resnet", frozen=True).train()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    body(torch.rand(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())
    assert not any(p.requires_grad for p in body.stages.parameters())


def test_detector_and_segmenter_train_and_predict() -> None:
    body = PyramidBody(_net("test_resnet"), name="test_resnet")
    det = create_detector(body, num_classes=3, masks=True, image_size=64, mean=[0.5] * 3,
                          std=[0.5] * 3).train()  # fmt: skip
    target = {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}  # fmt: skip
    losses = det([torch.rand(3, 64, 64)], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    out = det.eval()([torch.rand(3, 80, 60)])[0]  # predictions map back to the input's size
    assert out["masks"].shape[-2:] == (80, 60)
    seg = SemanticFPN(PyramidBody(_net("test_convnext"), name="c"), num_classes=4)
    assert seg(torch.rand(2, 3, 64, 64)).shape == (2, 4, 64, 64)


def test_proposal_budgets_shrink_with_area_and_keep_torchvision_defaults_at_800() -> None:
    assert proposal_budgets(800)["rpn_post_nms_top_n_train"] == 2000
    assert proposal_budgets(1333)["box_batch_size_per_image"] == 512
    small = proposal_budgets(128)
    assert small["rpn_post_nms_top_n_train"] == 128 and small["box_batch_size_per_image"] == 64
    assert proposal_budgets(400)["rpn_pre_nms_top_n_train"] == 500


def test_classifier_frozen_trains_the_head_only() -> None:
    model = Classifier(_net("test_resnet"), num_classes=5, frozen=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("net.fc.") for n in trainable)
    net = _net("tv:resnet18")
    net.fc = nn.Identity()  # as bob-cache's torchvision backbones come: head split off
    tv = Classifier(net, num_classes=5)  # a new Linear head on the pooled output
    assert tv(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_layer_decay_scales_vit_blocks_and_leaves_heads_at_full_rate() -> None:
    net = _net("test_vit")
    head = nn.Linear(4, 4)
    model = nn.ModuleDict({"net": net, "head": head})
    decay = resolve_layer_decay(net, None)
    assert decay == 0.75 and resolve_layer_decay(_net("test_resnet"), None) == 1.0
    opt = create_optimizer(model, net, lr=1e-3, weight_decay=0.05, layer_decay=decay)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rate[id(head.weight)] == pytest.approx(1e-3)
    depth = len(net.blocks) + 1  # timm's groups: the embedding, one per block, the final norm
    assert rate[id(net.patch_embed.proj.weight)] == pytest.approx(1e-3 * 0.75**depth)
    assert rate[id(net.blocks[-1].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.75)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(head.bias) in no_decay and id(head.weight) not in no_decay


def test_schedule_warms_up_then_decays_to_zero() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0, "lr_scale": 1.0}])
    sched = create_scheduler(opt, total_steps=10, warmup_steps=2)
    rates = []
    for step in range(1, 11):
        sched.step_update(step)
        rates.append(opt.param_groups[0]["lr"])
    assert rates[0] < rates[1] and max(rates) == pytest.approx(rates[1], rel=0.2)
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in itertools.pairwise(rates[1:]))
    assert not math.isnan(sum(rates))
