import pytest
import torch

from msn.models.backbone import MaskedViT
from msn.weights.convert import ConversionError, backbone_to_hf, check_compatible, from_original_msn, hf_to_backbone


@pytest.fixture(scope="module")
def backbone() -> dict:
    torch.manual_seed(0)
    return MaskedViT("vit_pico", patch_size=8, img_size=32).state_dict()


def test_hf_keys_and_qkv_split(backbone):
    hf = backbone_to_hf(backbone)
    qkv = backbone["blocks.2.attn.qkv.weight"]  # (3D, D), rows in q, k, v order
    assert torch.equal(hf["encoder.layer.2.attention.attention.query.weight"], qkv[:128])
    assert torch.equal(hf["encoder.layer.2.attention.attention.key.weight"], qkv[128:256])
    assert torch.equal(hf["encoder.layer.2.attention.attention.value.bias"], backbone["blocks.2.attn.qkv.bias"][256:])
    assert torch.equal(hf["embeddings.position_embeddings"], backbone["pos_embed"])
    assert torch.equal(hf["encoder.layer.0.intermediate.dense.weight"], backbone["blocks.0.mlp.fc1.weight"])
    assert torch.equal(hf["layernorm.bias"], backbone["norm.bias"])
    assert len(hf) == len(backbone) + 2 * 4 * 2  # each fused qkv weight / bias becomes three tensors


def test_round_trip_is_identity(backbone):
    back = hf_to_backbone(backbone_to_hf(backbone))
    assert set(back) == set(backbone)
    assert all(torch.equal(back[k], v) for k, v in backbone.items())
    # ViTMSNForImageClassification keys (vit. prefix, classifier) give the same backbone
    prefixed = {f"vit.{k}": v for k, v in backbone_to_hf(backbone).items()}
    prefixed["classifier.weight"] = torch.zeros(10, 128)
    assert set(hf_to_backbone(prefixed)) == set(backbone)


def test_unknown_or_incomplete_keys_fail_loudly(backbone):
    with pytest.raises(ConversionError, match="unexpected backbone key 'head.weight'"):
        backbone_to_hf({**backbone, "head.weight": torch.zeros(10, 128)})
    hf = backbone_to_hf(backbone)
    del hf["encoder.layer.1.attention.attention.key.bias"]
    with pytest.raises(ConversionError, match="layer 1: attention bias has"):
        hf_to_backbone(hf)
    with pytest.raises(ConversionError, match="missing encoder, target_encoder"):
        from_original_msn({"prototypes": torch.zeros(2, 2)})


def test_check_compatible_names_every_difference():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ConversionError) as err:
        check_compatible(expected, {"a": torch.zeros(4), "c": torch.zeros(1)}, "weights")
    text = str(err.value)
    assert "\n" not in text  # one line, for the one-line error of the command-line tools
    assert "different shapes (1): a: expected (2,), got (4,)" in text
    assert "missing keys (1): b" in text and "unexpected keys (1): c" in text
    check_compatible(expected, dict(expected), "weights")
