import copy

import pytest
import torch

from msn.models.heads import ProjectionHead
from msn.models.masking import ViewMasks
from msn.models.msn import MSN
from msn.train.builder import build_mask_generator
from msn.train.loss import MSNLoss
from msn.train.optim import build_optimizer, param_groups
from msn.train.schedules import StepHyperParams
from msn.train.step import train_step
from tests.conftest import compose_config


@pytest.fixture()
def cfg(tmp_path):
    return compose_config(["experiment=cpu_smoke", f"run_dir={tmp_path}", "masking.ratio=0.3"])


def _views(batch: int = 4, focal: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(focal)]


def _hp(momentum: float = 0.9) -> StepHyperParams:
    return StepHyperParams(lr=1e-3, weight_decay=0.04, momentum=momentum, sharpen_T=0.25)


def _masks(cfg, views: list[torch.Tensor], step: int = 0) -> ViewMasks:
    make = build_mask_generator(cfg)
    return make(step, views[0].shape[0], anchor_size=views[1].shape[-1], focal_size=views[-1].shape[-1],
                num_focal=len(views) - 2)


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
    views = _views()
    train_step(model, MSNLoss(), optimizer, views, _masks(cfg, views), hp=_hp(momentum=0.9),
               clip_grad=cfg.optim.clip_grad)

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
    views = _views()
    train_step(model, MSNLoss(), build_optimizer(model, cfg.optim), views, _masks(cfg, views), hp=_hp(), clip_grad=None)
    hook.remove()
    # target (unmasked, 1 + 16 tokens) is run by the target copy; online: anchor 1 + 11, focal 1 + 2
    assert seen == [1 + int(16 * 0.7), 1 + int(4 * 0.7)]


def test_head_runs_once_per_resolution_group(cfg):
    """Anchors and focal views each go through the head on their own (the original's BatchNorm statistics)."""
    torch.manual_seed(0)
    model = MSN(cfg.model).train()
    views = _views()
    focal = torch.cat(views[2:])
    anchors, _ = model(views[0], views[1], focal)
    head = copy.deepcopy(model.online.head)  # fresh running statistics are irrelevant in train mode
    expected = torch.cat([head(model.online.backbone(views[1])), head(model.online.backbone(focal))])
    torch.testing.assert_close(anchors, expected, atol=1e-6, rtol=1e-6)
    assert int(model.online.head.bn1.num_batches_tracked) == 2  # one BN update per group

    model.head_per_resolution = False  # the joint pass: one BN batch over both groups
    joint, _ = model(views[0], views[1], focal)
    assert (joint - anchors).abs().max() > 1e-3
    torch.testing.assert_close(joint, head(torch.cat([model.online.backbone(views[1]),
                                                       model.online.backbone(focal)])), atol=1e-6, rtol=1e-6)


def test_clipping_covers_the_encoder_only(cfg):
    """The prototypes' gradient is neither in the clipped norm nor scaled by the clipping (as the original)."""
    torch.manual_seed(0)
    model = MSN(cfg.model)
    reference = copy.deepcopy(model)
    views = _views()
    masks = _masks(cfg, views)
    clipped = train_step(model, MSNLoss(), build_optimizer(model, cfg.optim), views, masks, hp=_hp(), clip_grad=1e-3)
    free = train_step(reference, MSNLoss(), build_optimizer(reference, cfg.optim), views, masks, hp=_hp(),
                      clip_grad=None)
    encoder_norm = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(p.grad) for p in reference.online.parameters()]))
    assert clipped.encoder_grad_norm.item() == pytest.approx(encoder_norm.item(), rel=1e-5)  # before clipping
    assert free.encoder_grad_norm.item() == pytest.approx(encoder_norm.item(), rel=1e-5)
    torch.testing.assert_close(model.prototypes.grad, reference.prototypes.grad, atol=0, rtol=0)
    scale = 1e-3 / encoder_norm.item()
    for (name, p), q in zip(model.online.named_parameters(), reference.online.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad * scale, atol=1e-9, rtol=1e-4, msg=name)


def test_msn_weight_init():
    """The original's initialisation: CLS token N(0, 0.02), patch projection Kaiming-normal, head N(0, 0.02)."""
    torch.manual_seed(0)
    cfg = compose_config(["model=vit_small", "model.patch_size=16", "model.img_size=224"]).model
    model = MSN(cfg)
    backbone, head = model.online.backbone, model.online.head
    assert backbone.cls_token.std().item() == pytest.approx(0.02, rel=0.15)
    fan_in = 3 * 16 * 16
    assert backbone.patch_embed.proj.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    assert not backbone.patch_embed.proj.bias.any()
    for layer in (head.fc1, head.fc2, head.fc3, backbone.blocks[0].attn.qkv):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert not layer.bias.any()
    torch.testing.assert_close(model.target.state_dict(), model.online.state_dict())

    timm_init = MSN(compose_config(["model=vit_small", "model.weight_init=timm"]).model)
    assert timm_init.online.backbone.cls_token.std().item() < 1e-4  # timm's N(0, 1e-6)
    assert timm_init.online.head.fc1.bias.any()  # PyTorch's default Linear init


def test_architecture_given_field_by_field(tmp_path):
    cfg = compose_config(["model.arch=null", "model.embed_dim=64", "model.depth=2", "model.num_heads=2"]).model
    backbone = MSN(cfg).online.backbone
    assert (backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].attn.num_heads) == (64, 2, 2)
    assert backbone.blocks[0].mlp.fc1.out_features == 256
    deeper = MSN(compose_config(["model=vit_pico", "model.depth=6"]).model).online.backbone
    assert (deeper.embed_dim, len(deeper.blocks), deeper.blocks[0].attn.num_heads) == (128, 6, 4)


def test_fused_adamw_takes_the_same_step(cfg):
    """fused=True (used on GPUs; PyTorch also has it on the CPU) is the same AdamW arithmetic.

    In float64: Adam turns float32 rounding noise in gradients that are zero in exact arithmetic (the key
    bias of attention) into lr-sized steps, whichever implementation rounds."""
    torch.manual_seed(0)
    plain = MSN(cfg.model).double()
    fused = copy.deepcopy(plain)
    views = [v.double() for v in _views()]
    masks = _masks(cfg, views)
    for model, flag in ((plain, False), (fused, True)):
        optimizer = build_optimizer(model, cfg.optim, fused=flag)
        assert bool(optimizer.param_groups[0]["fused"]) is flag
        for _ in range(2):
            train_step(model, MSNLoss(), optimizer, views, masks, hp=_hp(), clip_grad=cfg.optim.clip_grad)
    for (name, a), b in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=name)


def test_building_the_model_and_probing_leave_the_callers_random_stream_alone():
    """Library code draws from seeded streams of its own: the same initial weights for a seed, whatever the
    caller's global generator holds, and the caller's next draw is what it would have been."""
    from msn.eval.protocols.linear import linear_probe
    from msn.train.builder import build_model

    cfg = compose_config(["experiment=cpu_smoke"])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(cfg, device=torch.device("cpu")).state_dict()
    x, y = torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2
    accuracy = linear_probe(x, y, x, y, epochs=3, seed=1)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)  # another caller state: the same weights and the same probe
    second = build_model(cfg, device=torch.device("cpu")).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert linear_probe(x, y, x, y, epochs=3, seed=1) == accuracy


def test_grad_checkpointing_recomputes_the_online_blocks_and_gives_identical_gradients():
    """model.grad_checkpointing=true: every online block runs again in the backward pass (so its activations were
    not kept), and the gradients are those of the plain step, bit for bit in float64, stochastic depth included
    (the recomputation replays the random stream)."""
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        cfg = compose_config(["experiment=cpu_smoke", "model.drop_path_rate=0.2",
                              f"model.grad_checkpointing={str(checkpointing).lower()}"])
        torch.manual_seed(0)
        model = MSN(cfg.model).double().train()
        calls = []
        for block in model.online.backbone.blocks:  # count the block's runs (checkpoint's recompute skips hooks)
            def counted(*args, _forward=block.forward, **kwargs):
                calls.append(1)
                return _forward(*args, **kwargs)

            block.forward = counted
        views = [v.double() for v in _views()]
        masks = _masks(cfg, views)
        torch.manual_seed(1)  # the drop-path draws
        anchors, targets = model(views[0], views[1], torch.cat(views[2:]), masks.anchor_keep, masks.focal_keep)
        out = MSNLoss()(anchors, targets, model.prototypes)
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    depth = 4  # vit_pico
    assert plain_calls == 2 * depth  # anchors, focal views
    assert checkpointed_calls == 2 * plain_calls  # each block once more, in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=0, rtol=0, msg=name)
