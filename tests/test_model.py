import copy

import pytest
import torch

from msn.heads import ProjectionHead
from msn.loss import MSNLoss
from msn.model import MSN
from msn.optim import build_optimizer, param_groups
from msn.schedules import Schedules
from msn.train import train_step
from tests.conftest import compose_config


@pytest.fixture()
def cfg(tmp_path):
    return compose_config(["experiment=cpu_smoke", f"run_dir={tmp_path}", "masking.ratio=0.3"])


def _views(batch: int = 4, focal: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(focal)]


def _schedules(momentum: float = 0.9) -> Schedules:
    return Schedules(total_steps=10, warmup_steps=0, lr=1e-3, start_lr=1e-3, final_lr=1e-3, weight_decay=0.04,
                     final_weight_decay=0.04, momentum=momentum, final_momentum=momentum, sharpen_T=0.25,
                     final_sharpen_T=0.25)


def test_head_layout():
    head = ProjectionHead(384)
    assert [n for n, _ in head.named_children()] == ["fc1", "bn1", "act1", "fc2", "bn2", "act2", "fc3"]
    assert head(torch.randn(4, 384)).shape == (4, 256)


def test_forward_shapes_view_major(cfg):
    torch.manual_seed(0)
    model = MSN(cfg.model)
    views = _views()
    anchors, targets = model(views[0], views[1], torch.cat(views[2:]))
    assert anchors.shape == (3 * 4, cfg.model.head_output_dim)
    assert targets.shape == (4, cfg.model.head_output_dim) and not targets.requires_grad


def test_one_step_gives_every_parameter_a_gradient_and_ema_target(cfg):
    torch.manual_seed(0)
    model = MSN(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    online_before = copy.deepcopy(model.online.state_dict())
    target_before = copy.deepcopy(model.target.state_dict())
    protos_before = model.prototypes.detach().clone()
    train_step(model, MSNLoss(), optimizer, _views(), cfg, _schedules(momentum=0.9), step=0)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n == "prototypes" for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        assert name.startswith(("online.", "prototypes"))
    assert not torch.equal(model.prototypes.detach(), protos_before)  # the prototypes learn
    assert all(p.grad is None for p in model.target.parameters())

    online_after = model.online.state_dict()
    for name, target in model.target.named_parameters():
        assert not torch.equal(online_after[name], online_before[name]), f"online {name} did not move"
        expected = 0.9 * target_before[name] + 0.1 * online_after[name]
        torch.testing.assert_close(target, expected, atol=1e-6, rtol=1e-6)


def test_weight_decay_groups(cfg):
    model = MSN(cfg.model)
    decay, no_decay = param_groups(model)
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert id(model.prototypes) in no_decay_ids
    names = {id(p): n for n, p in model.online.named_parameters()}
    assert all(names[i].endswith(".weight") or names[i] in ("backbone.cls_token", "backbone.pos_embed")
               for i in decay_ids)
    assert all(p.ndim > 1 for p in decay["params"])
    assert {names[i] for i in no_decay_ids if i in names} >= {"backbone.norm.weight", "backbone.norm.bias",
                                                               "head.bn1.weight", "head.fc1.bias"}
    assert len(decay_ids) + len(no_decay_ids) == sum(1 for p in model.parameters() if p.requires_grad)


def test_focal_masking_option(cfg):
    cfg.masking.mask_focal = True
    torch.manual_seed(0)
    model = MSN(cfg.model)
    seen = []
    hook = model.online.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    train_step(model, MSNLoss(), build_optimizer(model, cfg.optim), _views(), cfg, _schedules(), step=0)
    hook.remove()
    # target (unmasked, 1 + 16 tokens) is run by the target copy; online: anchor 1 + 11, focal 1 + 2
    assert seen == [1 + int(16 * 0.7), 1 + int(4 * 0.7)]
