"""Online-RL advantages and policy losses against values worked out by hand from each paper's equation."""

import math

import pytest
import torch

from posttrain.losses import policy
from posttrain.losses.policy import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    aggregate,
    clipped_surrogate,
    entropy_from_logits,
    token_kl,
    value_loss,
)
from posttrain.rl.advantages import equal_reward_groups, gae, group_advantages, rloo_advantages, whiten


def t(*rows, dtype=torch.float32, requires_grad=False):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype, requires_grad=requires_grad)


def close(tensor: torch.Tensor, expected, tol: float = 1e-6) -> bool:
    return torch.allclose(tensor, torch.as_tensor(expected, dtype=tensor.dtype), rtol=tol, atol=tol)


# --- GAE (Schulman et al. 2016, eq. 16) --------------------------------------------------------


def test_gae_hand_values_with_a_padded_row():
    # γ = 0.9, λ = 0.8, γλ = 0.72
    # Row 0, three real tokens: r = [0, 0, 1], V = [0.5, 0.6, 0.7], V after the last token = 0
    #   δ2 = 1 + 0.9·0   - 0.7 = 0.3
    #   δ1 = 0 + 0.9·0.7 - 0.6 = 0.03
    #   δ0 = 0 + 0.9·0.6 - 0.5 = 0.04
    #   A2 = 0.3; A1 = 0.03 + 0.72·0.3 = 0.246; A0 = 0.04 + 0.72·0.246 = 0.21712
    #   returns = A + V = [0.71712, 0.846, 1.0]
    # Row 1, two real tokens then padding holding junk (r = 5, V = 9) that must be ignored:
    #   δ1 = 2 + 0.9·0 - 0.5 = 1.5          (V past the last real token is 0, not 9)
    #   δ0 = 0.1 + 0.9·0.5 - 1.0 = -0.45
    #   A1 = 1.5; A0 = -0.45 + 0.72·1.5 = 0.63; returns = [1.63, 2.0]
    rewards = t([0.0, 0.0, 1.0], [0.1, 2.0, 5.0])
    values = t([0.5, 0.6, 0.7], [1.0, 0.5, 9.0], requires_grad=True)
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert close(advantages, [[0.21712, 0.246, 0.3], [0.63, 1.5, 0.0]])
    assert close(returns, [[0.71712, 0.846, 1.0], [1.63, 2.0, 0.0]])
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    # γ = λ = 1: A_t = Σ_l δ_{t+l} telescopes to Σ_l r_{t+l} + V_end - V_t with V_end = 0.
    # r = [1, 2, 3], reward-to-go = [6, 5, 3]; V = [0.5, 1, 1.5] -> A = [5.5, 4, 1.5]
    # Second row: one real token, r = 4, V = 1 -> A = 3; returns = reward-to-go = [4]
    rewards = t([1.0, 2.0, 3.0, 0.0], [4.0, 7.0, 7.0, 7.0])
    values = t([0.5, 1.0, 1.5, 2.0], [1.0, 3.0, 3.0, 3.0])
    mask = t([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(advantages, [[5.5, 4.0, 1.5, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert close(returns, [[6.0, 5.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])


def test_gae_validates():
    ones = torch.ones(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        gae(ones, torch.ones(2, 4), ones)
    with pytest.raises(ValueError, match="prefix"):
        gae(ones, ones, t([1.0, 0.0, 1.0], [1.0, 1.0, 1.0]))


# --- GRPO / Dr. GRPO (Shao et al. 2024 §4.1.2; Liu et al. 2025), RLOO (Ahmadian et al. 2024) ----

# Two groups of 3: [1, 2, 3] and [0, 0, 3]
REWARDS = t(1.0, 2.0, 3.0, 0.0, 0.0, 3.0)


def test_group_advantages_hand_values():
    # Group 1: mean 2, r - mean = [-1, 0, 1], sample var = (1 + 0 + 1) / 2 = 1, std 1
    # Group 2: mean 1, r - mean = [-1, -1, 2], sample var = (1 + 1 + 4) / 2 = 3, std √3 = 1.7320508
    #   -> [-1/√3, -1/√3, 2/√3] = [-0.5773503, -0.5773503, 1.1547005]
    eps = 1e-6
    advantages = group_advantages(REWARDS, 3)
    root3 = math.sqrt(3)
    expected = [-1 / (1 + eps), 0.0, 1 / (1 + eps), -1 / (root3 + eps), -1 / (root3 + eps), 2 / (root3 + eps)]
    assert close(advantages, expected)
    assert close(advantages, [-1.0, 0.0, 1.0, -0.5773503, -0.5773503, 1.1547005], tol=1e-5)


def test_dr_grpo_advantages_are_only_centred():
    # r - group mean: [-1, 0, 1] and [-1, -1, 2]
    assert close(group_advantages(REWARDS, 3, scale_by_std=False), [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])


def test_group_with_equal_rewards_gets_zero_advantage_not_nan():
    # std = 0: (0.5 - 0.5) / (0 + eps) = 0
    advantages = group_advantages(t(0.5, 0.5, 0.5, 1.0, 0.0, 0.0), 3)
    assert not torch.isnan(advantages).any()
    assert close(advantages[:3], [0.0, 0.0, 0.0])


def test_rloo_hand_values():
    # Group 1: 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5
    # Group 2: 0 - (0+3)/2 = -1.5; -1.5; 3 - (0+0)/2 = 3
    advantages = rloo_advantages(REWARDS, 3)
    assert close(advantages, [-1.5, 0.0, 1.5, -1.5, -1.5, 3.0])
    # = k/(k-1) (r - mean) = 3/2 · Dr. GRPO's advantage
    assert close(advantages, 1.5 * group_advantages(REWARDS, 3, scale_by_std=False))


def test_equal_reward_groups():
    # [1, 1, 1] all equal; [0, 1, 0] not; [0.25, 0.25, 0.25] all equal
    flags = equal_reward_groups(t(1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.25, 0.25, 0.25), 3)
    assert flags.dtype == torch.bool and flags.tolist() == [True, False, True]


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages, equal_reward_groups])
def test_group_functions_reject_a_partial_group(fn):
    with pytest.raises(ValueError, match="multiple of group_size"):
        fn(REWARDS, 4)


def test_group_advantages_need_two_samples_per_group():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        rloo_advantages(REWARDS, 1)


def test_whiten_hand_values():
    # Masked values 1, 2, 3, 4 (99 is padding): mean 2.5,
    # unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std = 1.2909944
    # (x - 2.5) / 1.2909944 = [-1.1618950, -0.3872983, 0.3872983, 1.1618950]
    values = t([1.0, 2.0, 3.0], [4.0, 99.0, 99.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 0.0, 0.0])
    std = math.sqrt(5 / 3 + 1e-8)
    assert close(whiten(values, mask), [[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    assert close(whiten(values, mask), [[-1.161895, -0.3872983, 0.3872983], [1.161895, 0.0, 0.0]])
    # shift_mean=False adds the mean 2.5 back: [1.338105, 2.1127017, 2.8872983, 3.661895]
    assert close(whiten(values, mask, shift_mean=False), [[1.338105, 2.1127017, 2.8872983], [3.661895, 0.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        whiten(values, t([1.0, 0.0, 0.0], [0.0, 0.0, 0.0]))


# --- KL estimators (Schulman 2020, "Approximating KL divergence") ------------------------------


def test_token_kl_hand_values():
    # Token 0: π = 0.5, π_ref = 0.25 -> logp - ref = log 2 = 0.693147
    #   k1 = 0.693147; k2 = ½ · 0.480453 = 0.240227; k3 = e^-log2 + log 2 - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # Token 1: π = 0.25, π_ref = 0.5 -> logp - ref = -log 2
    #   k1 = -0.693147; k2 = 0.240227; k3 = e^log2 - log 2 - 1 = 2 - 0.693147 - 1 = 0.306853
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    log2 = math.log(2)
    assert close(token_kl(logp, ref, "k1"), [[log2, -log2]])
    assert close(token_kl(logp, ref, "k2"), [[0.5 * log2**2, 0.5 * log2**2]])
    assert close(token_kl(logp, ref, "k3"), [[log2 - 0.5, 1 - log2]])
    assert close(token_kl(logp, ref), [[0.193147, 0.306853]])


def test_k1_and_k3_are_unbiased_over_the_policy_distribution():
    # π = [0.5, 0.25, 0.25], π_ref = [0.25, 0.5, 0.25]
    # KL(π || π_ref) = 0.5 log 2 + 0.25 log 0.5 + 0.25 log 1 = 0.25 log 2 = 0.173287
    # E_π[k3] = Σ π (π_ref/π - 1) + E_π[k1] = (1 - 1) + KL
    pi, ref = t(0.5, 0.25, 0.25), t(0.25, 0.5, 0.25)
    true_kl = 0.25 * math.log(2)
    for kind in ("k1", "k3"):
        estimate = (pi * token_kl(pi.log().unsqueeze(0), ref.log().unsqueeze(0), kind)).sum()
        assert close(estimate, true_kl)


def test_k3_is_non_negative_and_all_estimators_vanish_at_the_reference():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 7, generator=gen) * 3
    ref = torch.randn(4, 7, generator=gen) * 3
    assert (token_kl(logp, ref, "k3") >= 0).all()
    for kind in KL_ESTIMATORS:
        assert (token_kl(logp, logp.clone(), kind) == 0).all()


def test_token_kl_validates():
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        token_kl(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    with pytest.raises(ValueError, match="same shape"):
        token_kl(torch.zeros(1, 2), torch.zeros(1, 3))


# --- PPO clipped surrogate (Schulman et al. 2017, eq. 7) + DAPO decoupled clip (Yu et al. 2025) --

F64 = torch.float64


def surrogate_case(ratios, advantage, **clip):
    """One row of tokens at the given ratios (old_logp = 0, logp = log ratio), one advantage for the row."""
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=F64, requires_grad=True)
    # The cases at the boundary need exp(log r) to give r back exactly.
    assert torch.exp(logp.detach()).tolist() == [list(ratios)]
    loss, clipped = clipped_surrogate(logp, torch.zeros_like(logp), torch.tensor([advantage], dtype=F64), **clip)
    loss.sum().backward()
    return loss, clipped, logp.grad


def test_clipped_surrogate_positive_advantage():
    # A = 2, ε = 0.2 -> range [0.8, 1.2]; loss = -min(r A, clip(r) A)
    #   r = 1.1 inside:         -min(2.2, 2.2) = -2.2
    #   r = 1.2 at the bound:   -min(2.4, 2.4) = -2.4, not clipped
    #   r = 1.5 beyond:         -min(3.0, 2.4) = -2.4, clipped
    #   r = 0.5 below the low bound: -min(1.0, 1.6) = -1.0, the unclipped term is smaller: not clipped
    # d loss / d logp = -A r where the unclipped term is active (dr/dlogp = r), 0 where clipped:
    #   [-2.2, -2.4, 0, -1.0]
    loss, clipped, grad = surrogate_case((1.1, 1.2, 1.5, 0.5), 2.0)
    assert close(loss, [[-2.2, -2.4, -2.4, -1.0]])
    assert clipped.tolist() == [[False, False, True, False]]
    assert close(grad, [[-2.2, -2.4, 0.0, -1.0]])


def test_clipped_surrogate_negative_advantage():
    # A = -2, ε = 0.2
    #   r = 0.9 inside:         -min(-1.8, -1.8) = 1.8
    #   r = 0.8 at the bound:   -min(-1.6, -1.6) = 1.6, not clipped
    #   r = 0.5 beyond:         -min(-1.0, -1.6) = 1.6, clipped
    #   r = 1.5 above the high bound: -min(-3.0, -2.4) = 3.0, unclipped term active: not clipped
    # gradient -A r = 2 r: [1.8, 1.6, 0, 3.0]
    loss, clipped, grad = surrogate_case((0.9, 0.8, 0.5, 1.5), -2.0)
    assert close(loss, [[1.8, 1.6, 1.6, 3.0]])
    assert clipped.tolist() == [[False, False, True, False]]
    assert close(grad, [[1.8, 1.6, 0.0, 3.0]])


def test_clipped_surrogate_decoupled_bounds():
    # ε_low = 0.2, ε_high = 0.28 -> range [0.8, 1.28]
    # A = 1: r = 1.25 is now inside -> -1.25 (the symmetric 0.2 clip would give -1.2, clipped)
    #        r = 1.28 at the bound -> -1.28; r = 1.5 -> -min(1.5, 1.28) = -1.28, clipped
    loss, clipped, _ = surrogate_case((1.25, 1.28, 1.5), 1.0, clip_low=0.2, clip_high=0.28)
    assert close(loss, [[-1.25, -1.28, -1.28]])
    assert clipped.tolist() == [[False, False, True]]
    symmetric, symmetric_clipped, _ = surrogate_case((1.25,), 1.0)
    assert close(symmetric, [[-1.2]]) and symmetric_clipped.tolist() == [[True]]
    # A = -1: the low bound is still 0.8. r = 0.75 -> -min(-0.75, -0.8) = 0.8, clipped;
    #         r = 0.72 -> 0.8, clipped (it would be inside a 0.28 low bound)
    loss, clipped, grad = surrogate_case((0.75, 0.72), -1.0, clip_low=0.2, clip_high=0.28)
    assert close(loss, [[0.8, 0.8]])
    assert clipped.tolist() == [[True, True]]
    assert close(grad, [[0.0, 0.0]])


def test_clipped_surrogate_broadcasts_sequence_advantages_and_detaches_the_constants():
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(2, 5, generator=gen) * 0.3).requires_grad_(True)
    old = (torch.randn(2, 5, generator=gen) * 0.3).requires_grad_(True)
    advantages = torch.tensor([1.5, -0.5], requires_grad=True)
    per_sequence, clipped = clipped_surrogate(logp, old, advantages)
    per_token, clipped_tokens = clipped_surrogate(logp, old, advantages.detach().unsqueeze(-1).expand(2, 5))
    assert torch.equal(per_sequence, per_token) and torch.equal(clipped, clipped_tokens)
    per_sequence.sum().backward()
    # Only the policy being trained gets a gradient: old log-probs and advantages are constants.
    assert logp.grad is not None and old.grad is None and advantages.grad is None


def test_clipped_surrogate_validates():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, T\)"):
        clipped_surrogate(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="clip_low"):
        clipped_surrogate(x, x, torch.zeros(2), clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        clipped_surrogate(x, x, torch.zeros(2), clip_high=-0.1)


# --- PPO clipped value loss --------------------------------------------------------------------


def test_value_loss_clipped_and_unclipped():
    # c = 0.1
    # tok 0: V = 1.0, V_old = 0.8, R = 2.0: (V-R)² = 1; clip(V, 0.7, 0.9) = 0.9, (0.9-2)² = 1.21 -> ½·1.21 = 0.605
    # tok 1: V = 1.0, V_old = 1.2, R = 0.0: (V-R)² = 1; clip(V, 1.1, 1.3) = 1.1, 1.1² = 1.21 -> 0.605
    # tok 2: V = 0.5, V_old = 0.5, R = 0.6: inside, (0.5-0.6)² = 0.01 -> 0.005
    # tok 3: V = 2.0, V_old = 1.0, R = 0.0: (V-R)² = 4; clip -> 1.1, 1.21; max = 4 -> 2.0 (unclipped active)
    values = t([[1.0, 1.0, 0.5, 2.0]], dtype=F64, requires_grad=True)
    old = t([[0.8, 1.2, 0.5, 1.0]], dtype=F64)
    returns = t([[2.0, 0.0, 0.6, 0.0]], dtype=F64)
    loss = value_loss(values, old, returns, clip=0.1)
    assert close(loss, [[0.605, 0.605, 0.005, 2.0]])
    loss.sum().backward()
    # d/dV ½ (V-R)² = V - R where the unclipped term wins; 0 where the clipped one does (V outside the range)
    assert close(values.grad, [[0.0, 0.0, -0.1, 2.0]])
    # unclipped: ½ (V-R)² = [0.5, 0.5, 0.005, 2.0]
    assert close(value_loss(values, old, returns, clip=None), [[0.5, 0.5, 0.005, 2.0]])


def test_value_loss_validates():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip must be > 0"):
        value_loss(x, x, x, clip=0.0)
    with pytest.raises(ValueError, match="same shape"):
        value_loss(x, x, torch.zeros(1, 3))


# --- aggregate: token (DAPO), sequence (GRPO), fixed (Dr. GRPO) --------------------------------

PER_TOKEN = t([1.0, 2.0, 3.0], [4.0, 5.0, float("nan")], [float("inf"), 8.0, 9.0])
MASK = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0])


def test_aggregate_hand_values():
    # Masked tokens: row 0 = 1, 2, 3; row 1 = 4, 5; row 2 none (its inf and row 1's NaN are padding)
    # token:    1+2+3+4+5 = 15 over 5 tokens
    # sequence: mean(1,2,3) + mean(4,5) = 2 + 4.5 = 6.5 over 2 non-empty rows
    # fixed:    15 over 3 rows x max_tokens 4 = 12
    loss, units = aggregate(PER_TOKEN, MASK, "token")
    assert close(loss, 15.0) and units == 5.0
    loss, units = aggregate(PER_TOKEN, MASK, "sequence")
    assert close(loss, 6.5) and units == 2.0
    loss, units = aggregate(PER_TOKEN, MASK, "fixed", max_tokens=4)
    assert close(loss, 15.0) and units == 12.0


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_sums_over_micro_batches_equal_the_whole_batch(mode):
    # The caller's rule: Σ loss_sum / Σ units over micro-batches = the whole batch's value.
    whole = aggregate(PER_TOKEN, MASK, mode, max_tokens=4)
    parts = [aggregate(PER_TOKEN[rows], MASK[rows], mode, max_tokens=4) for rows in (slice(0, 1), slice(1, 3))]
    assert close(sum(p[0] for p in parts), whole[0]) and sum(p[1] for p in parts) == whole[1]


def test_aggregate_validates():
    with pytest.raises(ValueError, match="'token', 'sequence', 'fixed'"):
        aggregate(PER_TOKEN, MASK, "mean")
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(PER_TOKEN, MASK, "fixed")
    with pytest.raises(ValueError, match="same shape"):
        aggregate(PER_TOKEN, MASK[:, :2], "token")


# --- entropy ------------------------------------------------------------------------------------


def test_entropy_of_a_uniform_distribution_is_log_vocab():
    # Equal logits (any constant) -> p = 1/7 -> H = -7 · (1/7) log(1/7) = log 7 = 1.9459101
    logits = torch.full((2, 3, 7), 4.0, dtype=torch.bfloat16)
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (2, 3) and entropy.dtype == torch.float32
    assert close(entropy, torch.full((2, 3), math.log(7)))


def test_entropy_in_chunks_matches_the_direct_formula(monkeypatch):
    # 2 positions of 11 logits per chunk: rows of length 5 split into 3 chunks.
    monkeypatch.setattr(policy, "_CHUNK_ELEMENTS", 2 * 11)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen) * 3
    logits[0, 0, 3] = float("-inf")  # a banned token contributes 0, not NaN
    logits_view = logits.requires_grad_(True)[:, :-1]  # not contiguous: chunks must still be views
    log_p = logits_view.detach().log_softmax(-1)
    expected = -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)
    entropy = entropy_from_logits(logits_view)
    assert close(entropy, expected, tol=1e-5)
    assert not entropy.requires_grad
