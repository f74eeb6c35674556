import math
import re

import pytest
import torch

from msn.config import LossConfig
from msn.train.loss import MSNLoss, me_max, msn_loss, prototype_probabilities, sharpen, sinkhorn
from tests.dist_utils import run_distributed

REFERENCE_CASES = ["loss_default", "loss_no_sinkhorn", "loss_with_entropy"]


def test_hand_computed_example():
    # Two orthogonal prototypes; one anchor and one target both along e1; tau = T = 1, no Sinkhorn/ME-MAX.
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    out = msn_loss(x, x, prototypes, LossConfig(tau=1.0, sharpen_T=1.0, sinkhorn=False, me_max_weight=0.0))
    a = math.e / (1 + math.e)  # softmax([cos=1, cos=0])
    expected = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    assert out.terms["ce"].item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    # With tau = 0.5 the logits double: p = softmax([2, 0]); targets sharpened with T = 0.5 square p.
    out = msn_loss(x, x, prototypes, LossConfig(tau=0.5, sharpen_T=0.5, sinkhorn=False, me_max_weight=0.0))
    p = math.e**2 / (1 + math.e**2)
    t = p**2 / (p**2 + (1 - p) ** 2)
    assert out.terms["ce"].item() == pytest.approx(-(t * math.log(p) + (1 - t) * math.log(1 - p)), abs=1e-12)
    assert out.diagnostics["distinct_prototypes"].item() == 1
    assert out.diagnostics["max_target_prob"].item() == pytest.approx(t, abs=1e-12)


def test_me_max_zero_for_uniform_and_log_k_for_one_hot():
    assert me_max(torch.full((8,), 1 / 8, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)
    # Two anchors pointing at two different prototypes with equal confidence: uniform mean prediction.
    prototypes = torch.eye(2, dtype=torch.float64)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = msn_loss(anchors, anchors, prototypes, LossConfig(sinkhorn=False))
    assert out.terms["me_max"].item() == pytest.approx(0.0, abs=1e-12)
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
    out = MSNLoss(LossConfig(entropy_weight=0.5))(anchors, targets, prototypes)
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
    settings = LossConfig(tau=float(c["tau"]), sharpen_T=float(c["T"]), sinkhorn=bool(c["sinkhorn"]),
                          me_max_weight=float(bool(c["me_max"])), entropy_weight=float(bool(c["entropy"])))
    out = msn_loss(anchors, c["targets_in"], prototypes, settings)
    out.loss.backward()
    assert anchors.shape[0] // c["targets_in"].shape[0] == int(c["num_views"])
    close = dict(atol=1e-10, rtol=0)
    torch.testing.assert_close(out.targets, c["sharpened_targets"], **close)
    torch.testing.assert_close(out.terms["ce"], c["ce"], **close)
    torch.testing.assert_close(out.terms["me_max"], c["me_max_value"], **close)
    torch.testing.assert_close(out.terms["entropy"], c["entropy_value"], **close)
    torch.testing.assert_close(out.loss, c["total"], **close)
    torch.testing.assert_close(anchors.grad, c["grad_anchors"], **close)
    torch.testing.assert_close(prototypes.grad, c["grad_prototypes"], **close)
    assert out.diagnostics["distinct_prototypes"].item() == c["distinct_target_prototypes"].item()


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
    return {"targets": out.targets, "me_max": out.terms["me_max"].detach(), "ce": out.terms["ce"].detach(),
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
        torch.testing.assert_close(r["me_max"], full.terms["me_max"])
    torch.testing.assert_close(sum(r["ce"] for r in results) / 2, full.terms["ce"])
    # DDP averages gradients over ranks: the average equals the single-process gradient.
    torch.testing.assert_close(sum(r["grad_prototypes"] for r in results) / 2, prototypes.grad)
    batch = 4
    for rank, r in enumerate(results):
        rows = torch.cat([torch.arange(rank * batch, (rank + 1) * batch) + v * 8 for v in range(3)])
        torch.testing.assert_close(r["grad_anchors"] / 2, anchors.grad[rows])


# PMSN (loss.prior=power_law) against lightly's independent PMSNLoss, in float64.
def _pmsn_inputs(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(3 * 6, 12, generator=g, dtype=torch.float64)  # 6 images, 3 anchor views, view-major
    targets = torch.randn(6, 12, generator=g, dtype=torch.float64)
    prototypes = torch.randn(20, 12, generator=g, dtype=torch.float64)
    return anchors, targets, prototypes


def _grads(loss_fn, anchors, targets, prototypes):
    a, p = anchors.clone().requires_grad_(True), prototypes.clone().requires_grad_(True)
    value = loss_fn(a, targets, p)
    value.backward()
    return value.detach(), a.grad, p.grad


def test_pmsn_agrees_with_lightly_in_float64(monkeypatch):
    """Value and gradients of loss.prior=power_law against lightly's PMSNLoss, with the one detail the two define
    differently changed in lightly's: the direction of the KL divergence.

    The paper's regulariser generalises ME-MAX = KL(mean prediction || uniform) to KL(mean prediction || prior),
    which is what msn computes (and why prior_tau=0 is exactly MSN). lightly 1.6 writes
    F.kl_div(input=mean.log(), target=prior), which PyTorch defines as KL(prior || mean). So the comparison uses
    lightly's own PMSNLoss, power-law prior, sharpening, Sinkhorn and cross-entropy, with its regulariser's two
    arguments swapped; the second half checks that the unmodified lightly differs from msn by exactly that swap.
    lightly builds its prior with torch's default dtype, so the test sets it to float64.
    """
    pmsn_loss = pytest.importorskip("lightly.loss.pmsn_loss")
    torch.set_default_dtype(torch.float64)  # lightly's power law: an int arange ** float takes the default dtype
    try:
        anchors, targets, prototypes = _pmsn_inputs()
        settings = LossConfig(tau=0.1, sharpen_T=0.25, sinkhorn=True, sinkhorn_iterations=3, me_max_weight=0.7,
                              prior="power_law", prior_tau=0.25)
        ours = _grads(lambda a, t, p: MSNLoss(settings)(a, t, p).loss, anchors, targets, prototypes)

        class PaperDirection(pmsn_loss.PMSNLoss):
            def regularization_loss(self, mean_anchor_probs: torch.Tensor) -> torch.Tensor:
                prior = pmsn_loss._power_law_distribution(mean_anchor_probs.shape[0], self.power_law_exponent,
                                                          mean_anchor_probs.device)
                return torch.nn.functional.kl_div(input=prior.log(), target=mean_anchor_probs, reduction="sum")

        kwargs = dict(temperature=0.1, sinkhorn_iterations=3, regularization_weight=0.7, power_law_exponent=0.25)
        theirs = _grads(lambda a, t, p: PaperDirection(**kwargs)(a, t, p, target_sharpen_temperature=0.25),
                        anchors, targets, prototypes)
        for mine, lightly_value in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, lightly_value, atol=1e-12, rtol=1e-10)

        # lightly unmodified: msn's value with KL(mean || prior) replaced by KL(prior || mean), nothing else.
        out = MSNLoss(settings)(anchors, targets, prototypes)
        mean = prototype_probabilities(anchors, prototypes, 0.1).mean(dim=0)
        prior = pmsn_loss._power_law_distribution(20, 0.25, mean.device)
        reverse = (prior * (prior.log() - mean.log())).sum()
        unmodified = pmsn_loss.PMSNLoss(**kwargs)(anchors, targets, prototypes, target_sharpen_temperature=0.25)
        torch.testing.assert_close(out.loss - 0.7 * out.terms["prior_kl"] + 0.7 * reverse, unmodified,
                                   atol=1e-12, rtol=1e-10)
        assert abs(out.terms["prior_kl"] - reverse) > 1e-3  # the two directions do differ on these inputs
    finally:
        torch.set_default_dtype(torch.float32)


def test_power_law_prior_with_exponent_zero_is_msn():
    """rho_k ~ k^-tau: decreasing for tau > 0, uniform for tau = 0, where PMSN's term is ME-MAX exactly."""
    from msn.train.loss import power_law_prior

    rho = power_law_prior(8, 0.25, like=torch.zeros((), dtype=torch.float64))
    assert rho.sum().item() == pytest.approx(1.0, abs=1e-15) and (rho.diff() < 0).all()
    torch.testing.assert_close(rho[0] / rho[7], torch.tensor(8.0 ** 0.25, dtype=torch.float64))
    anchors, targets, prototypes = _pmsn_inputs(4)
    msn = MSNLoss(LossConfig())(anchors, targets, prototypes)
    pmsn = MSNLoss(LossConfig(prior="power_law", prior_tau=0.0))(anchors, targets, prototypes)
    torch.testing.assert_close(pmsn.terms["prior_kl"], msn.terms["me_max"], atol=1e-14, rtol=0)
    torch.testing.assert_close(pmsn.loss, msn.loss, atol=1e-14, rtol=0)
    assert list(pmsn.terms) == ["ce", "prior_kl", "entropy"] and list(msn.terms) == ["ce", "me_max", "entropy"]


def mean_prototype_similarity(inputs, power: float = 1.0) -> torch.Tensor:
    """A user's term for the tests (a function target): mean cosine similarity of distinct prototypes."""
    p = torch.nn.functional.normalize(inputs.prototypes, dim=1)
    k = p.shape[0]
    return ((p @ p.T).sum() - k) / (k * (k - 1)) * power


class ConfidencePenalty:
    """A user's term for the tests (a class target): its weight-free value is scale * mean max anchor probability."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, inputs) -> torch.Tensor:
        return self.scale * inputs.anchor_probs.max(dim=1).values.mean()


def test_extra_terms_are_added_by_name_and_get_gradients():
    anchors, targets, prototypes = _pmsn_inputs(5)
    terms = {"spread": {"_target_": "tests.test_loss.mean_prototype_similarity", "weight": 0.5, "power": 2.0},
             "confidence": {"_target_": "tests.test_loss.ConfidencePenalty", "scale": 3.0}}
    plain = MSNLoss(LossConfig())(anchors, targets, prototypes)
    loss_fn = MSNLoss(LossConfig(extra_terms=terms))
    assert loss_fn.term_names == ["ce", "me_max", "entropy", "spread", "confidence"]
    a, p = anchors.clone().requires_grad_(True), prototypes.clone().requires_grad_(True)
    out = loss_fn(a, targets, p)
    spread = mean_prototype_similarity(type("I", (), {"prototypes": prototypes})(), power=2.0)
    confidence = 3.0 * prototype_probabilities(anchors, prototypes, 0.1).max(dim=1).values.mean()
    torch.testing.assert_close(out.terms["spread"], spread)
    torch.testing.assert_close(out.terms["confidence"], confidence)
    assert out.weights["spread"] == 0.5 and out.weights["confidence"] == 1.0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * spread + confidence)
    out.loss.backward()
    p_only = prototypes.clone().requires_grad_(True)
    mean_prototype_similarity(type("I", (), {"prototypes": p_only})(), power=2.0).backward()
    assert p.grad is not None and a.grad is not None
    # the term's gradient reaches the prototypes: without it they would get the plain loss's gradient only
    p_plain = prototypes.clone().requires_grad_(True)
    MSNLoss(LossConfig(extra_terms={"confidence": terms["confidence"]}))(anchors, targets, p_plain).loss.backward()
    torch.testing.assert_close(p.grad - p_plain.grad, 0.5 * p_only.grad)


@pytest.mark.parametrize(("terms", "says"), [
    ({"lr": {"_target_": "tests.test_loss.ConfidencePenalty"}}, "lr is a column of every run's metrics.csv"),
    ({"ce": {"_target_": "tests.test_loss.ConfidencePenalty"}}, "ce is a term of the MSN loss itself"),
    ({"x": {"weight": 1.0}}, "loss.extra_terms.x needs a _target_"),
    ({"x": {"_target_": "tests.no_such_module.term"}}, "loss.extra_terms.x._target_=tests.no_such_module.term: "
                                                      "cannot import it"),
    ({"x": {"_target_": "tests.test_loss.ConfidencePenalty", "weight": "heavy"}}, "weight='heavy' must be a finite"),
])
def test_bad_extra_terms_are_one_clear_error(terms, says):
    from msn.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        MSNLoss(LossConfig(extra_terms=terms))
