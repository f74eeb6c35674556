import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from msn.models.backbone import MaskedViT
from msn.models.masking import gather_tokens, keep_indices, num_kept


@pytest.mark.parametrize("n,ratio", [(196, 0.15), (196, 0.3), (196, 0.7), (16, 0.15), (36, 0.5), (10, 0.0)])
def test_keep_count_is_floor(n, ratio):
    keep = keep_indices(4, n, ratio)
    assert keep.shape == (4, int(n * (1 - ratio)))
    assert num_kept(n, ratio) == keep.shape[1]
    for row in keep:
        assert len(row.unique()) == len(row)  # no duplicates
        assert torch.equal(row, row.sort().values)  # kept tokens keep their order
        assert row.min() >= 0 and row.max() < n


def test_per_sample_masks_are_independent_and_batch_mode_shares_one():
    g = torch.Generator().manual_seed(0)
    keep = keep_indices(8, 196, 0.5, per_sample=True, generator=g)
    assert len({tuple(r.tolist()) for r in keep}) == 8
    shared = keep_indices(8, 196, 0.5, per_sample=False, generator=g)
    assert all(torch.equal(r, shared[0]) for r in shared)


def test_masks_reproducible_from_generator_seed():
    a = keep_indices(4, 64, 0.3, generator=torch.Generator().manual_seed(7))
    b = keep_indices(4, 64, 0.3, generator=torch.Generator().manual_seed(7))
    c = keep_indices(4, 64, 0.3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gather_keeps_cls_and_selected_patches():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # CLS + 4 patches
    keep = torch.tensor([[0, 3], [1, 2]])
    out = gather_tokens(tokens, keep)
    assert out.shape == (2, 3, 3)
    assert torch.equal(out[:, 0], tokens[:, 0])  # CLS always kept
    assert torch.equal(out[0, 1:], tokens[0, [1, 4]])
    assert torch.equal(out[1, 1:], tokens[1, [2, 3]])


def _flops(model: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, keep)
    return counter.get_total_flops()


def test_compute_shrinks_with_mask_ratio():
    model = MaskedViT("vit_tiny", patch_size=16, img_size=224).eval()
    x = torch.randn(1, 3, 224, 224)
    full = _flops(model, x, None)
    half = _flops(model, x, keep_indices(1, 196, 0.5))
    most = _flops(model, x, keep_indices(1, 196, 0.7))
    assert 0.45 < half / full < 0.56  # patch embedding is not masked; attention shrinks quadratically
    assert most < half < full
