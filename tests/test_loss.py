import math

import pytest
import torch

from msn.train.loss import MSNLoss, me_max, msn_loss, prototype_probabilities, sharpen, sinkhorn
from tests.dist_utils import run_distributed

REFERENCE_CASES = ["loss_default", "loss_no_sinkhorn", "loss_with_entropy"]


def test_hand_computed_example():
    # Two orthogonal prototypes; one anchor and one target both along e1; tau = T = 1, no Sinkhorn/ME-MAX.
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    out = msn_loss(x, x, prototypes, tau=1.0, T=1.0, use_sinkhorn=False, me_max_weight=0.0)
    a = math.e / (1 + math.e)  # softmax([cos=1, cos=0])
    expected = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    assert out.ce.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    # With tau = 0.5 the logits double: p = softmax([2, 0]); targets sharpened with T = 0.5 square p.
    out = msn_loss(x, x, prototypes, tau=0.5, T=0.5, use_sinkhorn=False, me_max_weight=0.0)
    p = math.e**2 / (1 + math.e**2)
    t = p**2 / (p**2 + (1 - p) ** 2)
    assert out.ce.item() == pytest.approx(-(t * math.log(p) + (1 - t) * math.log(1 - p)), abs=1e-12)
    assert out.distinct_prototypes.item() == 1
    assert out.max_target_prob.item() == pytest.approx(t, abs=1e-12)


def test_me_max_zero_for_uniform_and_log_k_for_one_hot():
    assert me_max(torch.full((8,), 1 / 8, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    # Two anchors pointing at two different prototypes with equal confidence: uniform mean prediction.
    prototypes = torch.eye(2, dtype=torch.float64)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = msn_loss(anchors, anchors, prototypes, use_sinkhorn=False)
    assert out.me_max.item() == pytest.approx(0.0, abs=1e-12)
    peaked = torch.tensor([1.0 - 1e-12, 1e-12 / 3, 1e-12 / 3, 1e-12 / 3], dtype=torch.float64)
    assert me_max(peaked).item() == pytest.approx(math.log(4), abs=1e-9)


def test_sharpen_preserves_argmax_and_normalises():
    p = torch.rand(16, 10, dtype=torch.float64).softmax(dim=1)
    for T in (0.1, 0.25, 0.5, 2.0):
        s = sharpen(p, T)
        assert torch.equal(s.argmax(dim=1), p.argmax(dim=1))
        torch.testing.assert_close(s.sum(dim=1), torch.ones(16, dtype=torch.float64))
    assert (sharpen(p, 0.25).max(dim=1).values >= p.max(dim=1).values).all()
    torch.testing.assert_close(sharpen(p, 1.0), p)


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(12, 4, generator=g, dtype=torch.float64).softmax(dim=1) ** 4
    q = sinkhorn(p, iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=torch.float64))  # each sample: mass 1
    # Enough iterations balance the prototypes too: each receives B / K of the mass.
    q = sinkhorn(p, iterations=200)
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 3.0, dtype=torch.float64), atol=1e-8, rtol=0)
    # Balancing moves mass towards rarely chosen prototypes.
    assert q.sum(dim=0).std() < p.sum(dim=0).std()


def test_gradients_reach_anchors_and_prototypes_not_targets():
    g = torch.Generator().manual_seed(1)
    anchors = torch.randn(3 * 4, 8, generator=g, requires_grad=True)
    targets = torch.randn(4, 8, generator=g, requires_grad=True)
    prototypes = torch.randn(16, 8, generator=g, requires_grad=True)
    out = MSNLoss(entropy_weight=0.5)(anchors, targets, prototypes)
    out.loss.backward()
    assert anchors.grad is not None and anchors.grad.abs().sum() > 0
    assert prototypes.grad is not None and prototypes.grad.abs().sum() > 0
    assert targets.grad is None


def test_rejects_anchor_count_not_multiple_of_batch():
    with pytest.raises(ValueError, match="multiple"):
        msn_loss(torch.randn(5, 4), torch.randn(2, 4), torch.randn(3, 4))


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_original_implementation(reference, case):
    c = reference[case]
    anchors = c["anchors"].clone().requires_grad_(True)
    prototypes = c["prototypes"].clone().requires_grad_(True)
    out = msn_loss(
        anchors, c["targets_in"], prototypes, tau=float(c["tau"]), T=float(c["T"]),
        use_sinkhorn=bool(c["sinkhorn"]), me_max_weight=float(bool(c["me_max"])),
        entropy_weight=float(bool(c["entropy"])),
    )
    out.loss.backward()
    assert anchors.shape[0] // c["targets_in"].shape[0] == int(c["num_views"])
    close = dict(atol=1e-10, rtol=0)
    torch.testing.assert_close(out.targets, c["sharpened_targets"], **close)
    torch.testing.assert_close(out.ce, c["ce"], **close)
    torch.testing.assert_close(out.me_max, c["me_max_value"], **close)
    torch.testing.assert_close(out.entropy, c["entropy_value"], **close)
    torch.testing.assert_close(out.loss, c["total"], **close)
    torch.testing.assert_close(anchors.grad, c["grad_anchors"], **close)
    torch.testing.assert_close(prototypes.grad, c["grad_prototypes"], **close)
    assert out.distinct_prototypes.item() == c["distinct_target_prototypes"].item()


def test_probabilities_are_cosine_softmax():
    x, protos = torch.randn(5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(x[:, None], protos[None], dim=-1)
    torch.testing.assert_close(prototype_probabilities(x, protos, 0.1), (cos / 0.1).softmax(dim=1))


def _distributed_loss_worker(rank: int, world: int, data: dict) -> dict:
    batch = data["targets"].shape[0] // world
    views = data["anchors"].shape[0] // data["targets"].shape[0]
    rows = torch.arange(rank * batch, (rank + 1) * batch)
    local_rows = torch.cat([rows + v * data["targets"].shape[0] for v in range(views)])  # view-major shard
    anchors = data["anchors"][local_rows].clone().requires_grad_(True)
    prototypes = data["prototypes"].clone().requires_grad_(True)
    out = msn_loss(anchors, data["targets"][rows], prototypes)
    out.loss.backward()
    return {"targets": out.targets, "me_max": out.me_max.detach(), "ce": out.ce.detach(),
            "grad_prototypes": prototypes.grad, "grad_anchors": anchors.grad}


def test_sinkhorn_and_me_max_are_global_across_processes():
    """Two gloo processes with half the batch each reproduce the single-process figures."""
    g = torch.Generator().manual_seed(2)
    data = {"anchors": torch.randn(3 * 8, 16, generator=g, dtype=torch.float64),
            "targets": torch.randn(8, 16, generator=g, dtype=torch.float64),
            "prototypes": torch.randn(32, 16, generator=g, dtype=torch.float64)}
    anchors = data["anchors"].clone().requires_grad_(True)
    prototypes = data["prototypes"].clone().requires_grad_(True)
    full = msn_loss(anchors, data["targets"], prototypes)
    full.loss.backward()

    results = run_distributed(_distributed_loss_worker, world_size=2, args=(data,))
    torch.testing.assert_close(torch.cat([r["targets"] for r in results]), full.targets)
    for r in results:
        torch.testing.assert_close(r["me_max"], full.me_max)
    torch.testing.assert_close(sum(r["ce"] for r in results) / 2, full.ce)
    # DDP averages gradients over ranks: the average equals the single-process gradient.
    torch.testing.assert_close(sum(r["grad_prototypes"] for r in results) / 2, prototypes.grad)
    batch = 4
    for rank, r in enumerate(results):
        rows = torch.cat([torch.arange(rank * batch, (rank + 1) * batch) + v * 8 for v in range(3)])
        torch.testing.assert_close(r["grad_anchors"] / 2, anchors.grad[rows])
