import pytest
import torch

from msn.config.arch import ARCHITECTURES
from msn.models.backbone import MaskedViT, interpolate_pos_embed


@pytest.fixture(scope="module")
def tiny() -> MaskedViT:
    torch.manual_seed(0)
    model = MaskedViT("vit_tiny", patch_size=16, img_size=224).eval()
    torch.nn.init.normal_(model.pos_embed, std=0.5)  # make interpolation differences visible
    return model


@pytest.mark.parametrize("size", [224, 96, 160])
def test_multi_resolution_forward(tiny, size):
    with torch.no_grad():
        tokens = tiny.forward_features(torch.randn(2, 3, size, size))
        cls = tiny(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, 1 + (size // 16) ** 2, 192)
    assert cls.shape == (2, 192)


def test_rejects_size_not_multiple_of_patch(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(torch.randn(1, 3, 100, 100))


def test_interpolation_matches_hugging_face_vit_msn(tiny):
    from transformers import ViTMSNConfig
    from transformers.models.vit_msn.modeling_vit_msn import ViTMSNEmbeddings

    hf = ViTMSNEmbeddings(ViTMSNConfig(hidden_size=192, image_size=224, patch_size=16))
    hf.position_embeddings.data.copy_(tiny.pos_embed.data)
    for size in (96, 128, 288):
        grid = size // 16
        ours = interpolate_pos_embed(tiny.pos_embed, (grid, grid))
        theirs = hf.interpolate_pos_encoding(torch.zeros(1, 1 + grid * grid, 192), size, size)
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # timm's own resampling antialiases when shrinking, which would not match HF at 96 px
    from timm.layers import resample_abs_pos_embed

    timm_96 = resample_abs_pos_embed(tiny.pos_embed, new_size=(6, 6), old_size=(14, 14), num_prefix_tokens=1)
    assert not torch.allclose(timm_96, interpolate_pos_embed(tiny.pos_embed, (6, 6)))


def test_native_grid_is_untouched(tiny):
    assert interpolate_pos_embed(tiny.pos_embed, (14, 14)) is tiny.pos_embed


def test_keeping_every_token_equals_unmasked_forward(tiny):
    x = torch.randn(2, 3, 224, 224)
    keep = torch.arange(196).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(tiny(x, keep), tiny(x))


def test_masked_tokens_change_the_output(tiny):
    x = torch.randn(2, 3, 96, 96)
    keep = torch.arange(0, 36, 2).expand(2, -1)
    with torch.no_grad():
        assert tiny.forward_features(x, keep).shape == (2, 1 + 18, 192)
        assert not torch.allclose(tiny(x, keep), tiny(x))


def test_sdpa_and_eager_attention_agree(tiny):
    x = torch.randn(2, 3, 96, 96)
    keep = torch.arange(0, 36, 3).expand(2, -1)
    assert all(blk.attn.fused_attn for blk in tiny.blocks)  # timm routes through F.scaled_dot_product_attention
    with torch.no_grad():
        fused = tiny(x, keep)
        for blk in tiny.blocks:
            blk.attn.fused_attn = False
        try:
            eager = tiny(x, keep)
        finally:
            for blk in tiny.blocks:
                blk.attn.fused_attn = True
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def test_state_dict_uses_timm_names(tiny):
    import timm

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    assert set(tiny.state_dict()) == set(reference.state_dict())


# Backbone parameter counts (no classifier) of the standard ViTs, in millions.
PARAMS = {("vit_tiny", 16): 5.5, ("vit_small", 16): 21.7, ("vit_base", 16): 85.8, ("vit_large", 16): 303.3,
          ("vit_huge", 14): 630.8}


@pytest.mark.parametrize("arch,patch", list(PARAMS))
def test_preset_sizes(arch, patch):
    assert arch in ARCHITECTURES
    with torch.device("meta"):
        model = MaskedViT(arch, patch_size=patch, img_size=224)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PARAMS[(arch, patch)], rel=0.01)
