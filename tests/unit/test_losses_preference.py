"""Preference losses and sequence log-probs against values worked out by hand from each paper's equation."""

import math

import pytest
import torch

from posttrain.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from posttrain.losses.kto import kto_kl, kto_loss
from posttrain.losses.nll import IGNORE_INDEX, nll_sum
from posttrain.losses.orpo import orpo_loss
from posttrain.losses.reward import bradley_terry_loss
from posttrain.losses.simpo import simpo_loss
from posttrain.models import logprobs
from posttrain.models.logprobs import per_token_logps

IGNORE = -100


def t(*values, requires_grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=requires_grad)


def neg_log_sigmoid(x: float) -> float:
    # -log σ(x) = log(1 + e^-x)
    return math.log(1 + math.exp(-x))


def close(tensor: torch.Tensor, expected, tol: float = 1e-6) -> bool:
    return torch.allclose(tensor, torch.as_tensor(expected, dtype=tensor.dtype), rtol=tol, atol=tol)


# --- DPO (Rafailov et al. 2023, eq. 7) and variants ---------------------------------------------

# pc = -1, pr = -3, rc = -2, rr = -2.5
# h = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))


def test_dpo_with_policy_equal_to_reference_is_log_2_and_zero_rewards():
    # h = 0 for every pair, so -log σ(β·0) = -log(1/2) = log 2 whatever β.
    logps = t(-4.0, -17.5, -0.25)
    other = t(-6.0, -3.0, -9.0)
    for beta in (0.01, 0.1, 5.0):
        losses, chosen_r, rejected_r = dpo_loss(logps, other, logps, other, beta=beta)
        assert close(losses, [math.log(2)] * 3)
        assert close(chosen_r, [0.0] * 3) and close(rejected_r, [0.0] * 3)


def test_dpo_sigmoid_hand_value_and_detached_rewards():
    # β h = 0.1 · 1.5 = 0.15; -log σ(0.15) = log(1 + e^-0.15) = 0.62096
    pc = t(-1.0, requires_grad=True)
    losses, chosen_r, rejected_r = dpo_loss(pc, *PAIR[1:], beta=0.1)
    assert close(losses, [math.log(1 + math.exp(-0.15))])
    assert close(losses, [0.6209570477895321])
    # rewards: β (pc - rc) = 0.1 · 1 = 0.1; β (pr - rr) = 0.1 · -0.5 = -0.05
    assert close(chosen_r, [0.1]) and close(rejected_r, [-0.05])
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    assert losses.requires_grad


def test_cdpo_hand_value():
    # -(1-ε) log σ(βh) - ε log σ(-βh), ε = 0.1, βh = 0.15
    # = 0.9 · log(1 + e^-0.15) + 0.1 · log(1 + e^0.15) = 0.9 · 0.620957 + 0.1 · 0.770957 = 0.635957
    losses, _, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    assert close(losses, [0.9 * neg_log_sigmoid(0.15) + 0.1 * neg_log_sigmoid(-0.15)])
    assert close(losses, [0.635957047789532])


def test_rdpo_hand_value():
    # [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1 - 2ε), ε = 0.1, βh = 0.15
    # = (0.9 · 0.620957 - 0.1 · 0.770957) / 0.8 = (0.558861 - 0.077096) / 0.8 = 0.602207
    losses, _, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1, smoothing="robust")
    assert close(losses, [(0.9 * neg_log_sigmoid(0.15) - 0.1 * neg_log_sigmoid(-0.15)) / 0.8])
    assert close(losses, [0.602207047789532])


def test_smoothing_at_zero_is_plain_dpo():
    plain, _, _ = dpo_loss(*PAIR, beta=0.1)
    for smoothing in ("conservative", "robust"):
        smoothed, _, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.0, smoothing=smoothing)
        assert torch.equal(smoothed, plain)


def test_dpo_sigmoid_stays_finite_for_a_huge_wrong_margin():
    # β h = 1 · (0 - 1000) = -1000: -log σ(-1000) = 1000 + log(1 + e^-1000) = 1000 (log(σ) would give inf).
    losses, _, _ = dpo_loss(t(0.0), t(0.0), t(0.0), t(-1000.0), beta=1.0)
    assert close(losses, [1000.0])


def test_hinge_below_at_and_above_the_hinge():
    # relu(1 - β h) with β = 0.5 and rc = rr = pr = 0, so h = pc:
    # h = 1.5 -> 1 - 0.75 = 0.25; h = 2 -> 0 (exactly at the hinge); h = 3 -> 1 - 1.5 < 0 -> 0
    pc = t(1.5, 2.0, 3.0)
    zeros = t(0.0, 0.0, 0.0)
    losses, _, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.5, loss_type="hinge")
    assert close(losses, [0.25, 0.0, 0.0])


def test_ipo_hand_value():
    # (h - 1/(2β))² with h = 1.5, β = 0.1: (1.5 - 5)² = 12.25
    losses, _, _ = dpo_loss(*PAIR, beta=0.1, loss_type="ipo")
    assert close(losses, [12.25])


def test_ipo_minimum_is_at_h_equal_to_one_over_two_beta():
    # β = 0.25 -> 1/(2β) = 2. With the other three log-probs 0, h = pc.
    pc = t(1.5, 2.0, 2.5, requires_grad=True)
    zeros = t(0.0, 0.0, 0.0)
    losses, _, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.25, loss_type="ipo")
    # (1.5 - 2)² = 0.25, (2 - 2)² = 0, (2.5 - 2)² = 0.25
    assert close(losses, [0.25, 0.0, 0.25])
    losses.sum().backward()
    # d/dh (h - 2)² = 2 (h - 2): -1, 0, +1
    assert close(pc.grad, [-1.0, 0.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -0.1}, "beta must be > 0"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing must be in"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing must be in"),
        ({"beta": 0.1, "loss_type": "kto"}, "'sigmoid', 'hinge', 'ipo'"),
        ({"beta": 0.1, "smoothing": "soft"}, "'conservative', 'robust'"),
        ({"beta": 0.1, "loss_type": "hinge", "label_smoothing": 0.1}, "only for loss_type 'sigmoid'"),
        ({"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1}, "only for loss_type 'sigmoid'"),
    ],
)
def test_dpo_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(*PAIR, **kwargs)


def test_dpo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t(1.0, 2.0), t(1.0), t(1.0), t(1.0), beta=0.1)


def test_dpo_loss_types_export():
    assert DPO_LOSS_TYPES == ("sigmoid", "hinge", "ipo")


# --- SimPO (Meng et al. 2024, eq. 6) -----------------------------------------------------------


def test_simpo_hand_value():
    # r_w = β/|y_w| · log π = 2/3 · -6 = -4; r_l = 2/4 · -12 = -6
    # -log σ(r_w - r_l - γ) = -log σ(-4 + 6 - 0.5) = -log σ(1.5) = log(1 + e^-1.5) = 0.201413
    losses, chosen_r, rejected_r = simpo_loss(
        t(-6.0, requires_grad=True), t(-12.0), torch.tensor([3]), torch.tensor([4]), beta=2.0, gamma=0.5
    )
    assert close(losses, [math.log(1 + math.exp(-1.5))])
    assert close(losses, [0.2014132779827524])
    assert close(chosen_r, [-4.0]) and close(rejected_r, [-6.0])
    assert not chosen_r.requires_grad and losses.requires_grad


def test_simpo_gamma_is_a_shift_of_the_margin():
    # Raising the rejected reward by γ = 0.5 (r_l: -6 -> -5.5, i.e. log π_l = -5.5 · 4 / 2 = -11)
    # with no γ gives the same loss as γ = 0.5 on the original pair.
    lengths = (torch.tensor([3]), torch.tensor([4]))
    with_gamma, _, _ = simpo_loss(t(-6.0), t(-12.0), *lengths, beta=2.0, gamma=0.5)
    shifted, _, _ = simpo_loss(t(-6.0), t(-11.0), *lengths, beta=2.0, gamma=0.0)
    without_gamma, _, _ = simpo_loss(t(-6.0), t(-12.0), *lengths, beta=2.0, gamma=0.0)
    assert close(with_gamma, shifted)
    assert with_gamma.item() > without_gamma.item()


def test_simpo_validates():
    lengths = (torch.tensor([3]), torch.tensor([4]))
    with pytest.raises(ValueError, match="beta must be > 0"):
        simpo_loss(t(-6.0), t(-12.0), *lengths, beta=0.0, gamma=0.5)
    with pytest.raises(ValueError, match="same shape"):
        simpo_loss(t(-6.0, -1.0), t(-12.0), *lengths, beta=2.0, gamma=0.5)


# --- ORPO (Hong et al. 2024, eqs. 2-7) ---------------------------------------------------------


def test_orpo_hand_value():
    # a_w = -2 / 4 = -0.5; a_l = -6 / 3 = -2
    # log odds_w = a_w - log(1 - e^a_w) = -0.5 - log(1 - 0.606531) = -0.5 - log(0.393469) = -0.5 + 0.932752 = 0.432752
    # log odds_l = -2 - log(1 - e^-2) = -2 - log(0.864665) = -2 + 0.145413 = -1.854587
    # L_OR = -log σ(0.432752 + 1.854587) = log(1 + e^-2.287339) = 0.096706
    # L_SFT = -a_w = 0.5; loss = 0.5 + 0.1 · 0.096706 = 0.509671
    log_odds_w = -0.5 - math.log(1 - math.exp(-0.5))
    log_odds_l = -2.0 - math.log(1 - math.exp(-2.0))
    l_or = neg_log_sigmoid(log_odds_w - log_odds_l)
    losses, nll, odds_ratio_loss, chosen_r, rejected_r = orpo_loss(
        t(-2.0), t(-6.0), torch.tensor([4]), torch.tensor([3]), lam=0.1
    )
    assert close(nll, [0.5])
    assert close(odds_ratio_loss, [l_or]) and close(odds_ratio_loss, [0.09670586364939958])
    assert close(losses, [0.5 + 0.1 * l_or]) and close(losses, [0.50967058636494])
    assert close(chosen_r, [-0.5]) and close(rejected_r, [-2.0])


def test_orpo_loss_falls_as_the_chosen_answer_gets_likelier():
    chosen = t(-8.0, -4.0, -2.0, -1.0, -0.1, -1e-4)
    n = len(chosen)
    losses, nll, odds_ratio_loss, _, _ = orpo_loss(
        chosen, t(*[-6.0] * n), torch.full((n,), 4), torch.full((n,), 3), lam=0.5
    )
    for term in (losses, nll, odds_ratio_loss):
        assert (term[1:] < term[:-1]).all()


def test_orpo_stays_finite_when_an_answer_is_certain():
    # a = 0 means p = 1: infinite odds. The loss and its gradients must still be finite, and a
    # certain rejected answer must still be pushed down (positive gradient on its log-prob).
    chosen = t(0.0, -3.0, requires_grad=True)
    rejected = t(-3.0, 0.0, requires_grad=True)
    lengths = torch.tensor([3, 3])
    losses, _, _, _, _ = orpo_loss(chosen, rejected, lengths, lengths, lam=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert rejected.grad[1] > 0


def test_orpo_validates():
    lengths = torch.tensor([3])
    with pytest.raises(ValueError, match="lam must be >= 0"):
        orpo_loss(t(-2.0), t(-6.0), lengths, lengths, lam=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        orpo_loss(t(-2.0), t(-6.0), torch.tensor([3, 3]), lengths, lam=0.1)


# --- KTO (Ethayarajh et al. 2024, eq. 8) -------------------------------------------------------


def test_kto_with_zero_kl_hand_values():
    # r = policy - ref = -5 - -7 = 2; β r = 0.1 · 2 = 0.2; z0 = 0
    # desirable:   λ_D (1 - σ(0.2)) = 1.5 · (1 - 0.549834) = 1.5 · 0.450166 = 0.675249
    # undesirable: λ_U (1 - σ(-0.2)) = 2 · (1 - 0.450166) = 2 · 0.549834 = 1.099668
    sigma_02 = 1 / (1 + math.exp(-0.2))
    losses, rewards = kto_loss(
        t(-5.0, -5.0),
        t(-7.0, -7.0),
        torch.tensor([True, False]),
        torch.tensor(0.0),
        beta=0.1,
        desirable_weight=1.5,
        undesirable_weight=2.0,
    )
    assert close(losses, [1.5 * (1 - sigma_02), 2.0 * sigma_02])
    assert close(losses, [1.5 * 0.450166002687522, 2.0 * 0.549833997312478])
    assert close(rewards, [0.2, 0.2]) and not rewards.requires_grad


def test_kto_reference_point_shifts_the_reward():
    # z0 = 0.5: desirable β (r - z0) = 0.1 · (2 - 0.5) = 0.15 -> 1 - σ(0.15) = 0.462570
    losses, _ = kto_loss(t(-5.0), t(-7.0), torch.tensor([True]), torch.tensor(0.5), beta=0.1)
    assert close(losses, [1 - 1 / (1 + math.exp(-0.15))])
    assert close(losses, [0.4625701546562504])


def test_kto_kl_is_a_clamped_detached_mean():
    # 3 / 4 = 0.75; -3 / 4 = -0.75 -> clamped to 0 (a KL is never negative)
    total = torch.tensor(3.0, requires_grad=True)
    kl = kto_kl(total, 4)
    assert close(kl, 0.75) and kl.dim() == 0
    assert not kl.requires_grad
    assert close(kto_kl(torch.tensor(-3.0, requires_grad=True), torch.tensor(4)), 0.0)
    # No pairs at all: z0 = 0 rather than 0 / 0.
    assert close(kto_kl(torch.tensor(0.0), 0), 0.0)


def test_kto_validates():
    args = (t(-5.0), t(-7.0), torch.tensor([True]), torch.tensor(0.0))
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        kto_loss(*args, beta=0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t(-5.0), t(-7.0), torch.tensor([1.0]), torch.tensor(0.0), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(t(-5.0, -1.0), t(-7.0), torch.tensor([True]), torch.tensor(0.0), beta=0.1)
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(*args[:3], torch.tensor([0.0]), beta=0.1)


# --- Reward model: Bradley-Terry (Ouyang et al. 2022, eq. 1) -----------------------------------


def test_bradley_terry_hand_value():
    # -log σ(1.0 - 0.25) = log(1 + e^-0.75) = 0.386871
    losses = bradley_terry_loss(t(1.0), t(0.25))
    assert close(losses, [math.log(1 + math.exp(-0.75))]) and close(losses, [0.38687100611489994])


def test_bradley_terry_margin_shifts_and_nan_margin_is_zero():
    # margin 0.5: -log σ(1.0 - 0.25 - 0.5) = log(1 + e^-0.25) = 0.575939, the same as lowering r_c by 0.5
    r_c, r_r = t(1.0, 1.0), t(0.25, 0.25)
    losses = bradley_terry_loss(r_c, r_r, margin=torch.tensor([0.5, float("nan")], dtype=torch.float64))
    assert close(losses[0], neg_log_sigmoid(0.25)) and close(losses[0], 0.5759394198788436)
    assert close(losses[0], bradley_terry_loss(t(0.5), t(0.25))[0])
    assert close(losses[1], neg_log_sigmoid(0.75))
    assert not torch.isnan(losses).any()


def test_bradley_terry_center_term():
    # + 0.01 · (1.0 + 0.25)² = 0.01 · 1.5625 = 0.015625
    losses = bradley_terry_loss(t(1.0), t(0.25), center_weight=0.01)
    assert close(losses, [neg_log_sigmoid(0.75) + 0.015625])


def test_bradley_terry_validates():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(t(1.0, 2.0), t(0.25))
    with pytest.raises(ValueError, match="margin must have shape"):
        bradley_terry_loss(t(1.0), t(0.25), margin=t(0.5, 0.5))


# --- per_token_logps, summed per sequence as the preference methods use it -----------------------


def sequence_logps(logits, labels):
    """(Σ of each row's labelled-token log-probs, labelled tokens per row): what DPO/SimPO/ORPO/KTO compare."""
    return per_token_logps(logits, labels).sum(dim=-1), (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)


def brute_force_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Σ_t log softmax(logits[b, t])[labels[b, t+1]] with plain Python floats."""
    sums, counts = [], []
    for b in range(logits.size(0)):
        total, count = 0.0, 0
        for pos in range(logits.size(1) - 1):
            target = int(labels[b, pos + 1])
            if target == IGNORE:
                continue
            row = [float(x) for x in logits[b, pos]]
            top = max(row)
            log_norm = top + math.log(sum(math.exp(x - top) for x in row))
            total += row[target] - log_norm
            count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def reference_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The straightforward (memory-hungry) computation: full float32 log_softmax, gather, mask."""
    targets = labels[:, 1:]
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE, logps, 0.0)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=gen) * 3
    labels = torch.randint(0, 11, (4, 6), generator=gen)
    labels[0, :3] = IGNORE  # prompt masked, including the first position
    labels[1, 0] = IGNORE  # only the first position masked
    labels[1, 4] = IGNORE  # a hole in the middle
    labels[2, :] = IGNORE  # nothing scored
    # row 3: nothing masked, so its first label (position 0) is the one not counted
    return logits, labels


def test_sequence_logps_matches_a_python_loop(batch):
    logits, labels = batch
    logp_sum, n_tokens = sequence_logps(logits, labels)
    sums, counts = brute_force_logps(logits, labels)
    assert logp_sum.dtype == torch.float32 and n_tokens.dtype == torch.int64
    assert n_tokens.tolist() == counts == [3, 4, 0, 5]
    assert torch.allclose(logp_sum, torch.tensor(sums), atol=1e-5)


def test_the_first_label_is_never_scored(batch):
    # Position 0 has no logits before it: its label cannot change anything.
    logits, labels = batch
    other = labels.clone()
    other[:, 0] = 7
    assert torch.equal(sequence_logps(logits, labels)[0], sequence_logps(logits, other)[0])


def test_per_token_logps_is_zero_where_ignored(batch):
    logits, labels = batch
    logps = per_token_logps(logits, labels)
    assert logps.shape == (4, 5)
    assert (logps[labels[:, 1:] == IGNORE] == 0).all()
    assert (logps[labels[:, 1:] != IGNORE] < 0).all()


@pytest.mark.parametrize("chunk_elements", [2**24, 2 * 11])
def test_sequence_logps_gradient_matches_autograd_log_softmax(batch, monkeypatch, chunk_elements):
    # 2 * 11 = two rows per chunk, so the 24 rows are split into several chunks in both passes.
    monkeypatch.setattr(logprobs, "_CHUNK_ELEMENTS", chunk_elements)
    logits, labels = batch
    weights = torch.tensor([0.5, -2.0, 1.0, 3.0])
    ours = logits.clone().requires_grad_(True)
    (sequence_logps(ours, labels)[0] * weights).sum().backward()
    ref = logits.clone().requires_grad_(True)
    (reference_logps(ref, labels).sum(-1) * weights).sum().backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-6)
    assert ours.grad.abs().sum() > 0
    assert (ours.grad[2] == 0).all()  # the row with nothing scored gets no gradient


def test_per_token_logps_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(logprobs, "_CHUNK_ELEMENTS", 5)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE, 1, IGNORE, 4], [2, 0, 3, IGNORE]])
    assert torch.autograd.gradcheck(lambda x: per_token_logps(x, labels), (logits,))


def test_bf16_logits_give_float32_close_to_the_float32_computation(batch):
    logits, labels = batch
    low = logits.to(torch.bfloat16).requires_grad_(True)
    logp_sum, _ = sequence_logps(low, labels)
    assert logp_sum.dtype == torch.float32
    # The same bf16 values, upcast before anything else: only the summation order differs.
    expected = reference_logps(low.detach().float(), labels).sum(-1)
    assert torch.allclose(logp_sum, expected, atol=1e-5)
    logp_sum.sum().backward()
    assert low.grad.dtype == torch.bfloat16
    ref = low.detach().float().requires_grad_(True)
    reference_logps(ref, labels).sum().backward()
    assert torch.allclose(low.grad.float(), ref.grad, atol=1e-2)


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_logps(torch.zeros(5, 7), torch.zeros(5, dtype=torch.long))


def test_sequence_logps_agrees_with_nll_sum(batch):
    logits, labels = batch
    loss_sum, n = nll_sum(logits, labels)
    logp_sum, n_tokens = sequence_logps(logits, labels)
    assert torch.allclose(-logp_sum.sum(), loss_sum, atol=1e-5)
    assert n_tokens.sum() == n
