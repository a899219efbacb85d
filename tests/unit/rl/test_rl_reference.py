"""chatrl's RL math against independent re-implementations of DeepSpeed-Chat's, TRL's and OpenRLHF's
formulas, on the same random tensors, to 1e-6.

The `ref_*` functions below are written here from the published equations of each project (their
code was read to learn the conventions, not copied): DeepSpeed-Chat's ppo_trainer.py
(compute_rewards, get_advantages_and_returns, actor_loss_fn, critic_loss_fn) and reward_model.py;
TRL's PPOTrainer (>= 0.12: padding_mask / padding_mask_p1, INVALID_LOGPROB, masked_whiten) and
DPOTrainer's sigmoid loss; OpenRLHF's models/utils.py (compute_approx_kl, compute_reward),
experience_maker.py (GAE, advantage normalisation) and models/loss.py (PolicyLoss, ValueLoss,
DPOLoss). Where chatrl intentionally differs, the test checks the exact relationship and a
comment says what differs and why:

- the position of the score: DeepSpeed-Chat (pad == EOS, so the EOS is outside its action mask)
  and TRL put it one token past the last token they count; chatrl counts the EOS and scores it.
- the loss mean: OpenRLHF's sequence-level option averages per-sequence means; chatrl (like
  DeepSpeed-Chat, TRL and OpenRLHF's default) averages over all response tokens of the batch.
- whitening: DeepSpeed-Chat does not normalise advantages; OpenRLHF uses the biased variance
  with a floor, over its whole replay buffer on all ranks; chatrl the unbiased variance plus eps
  (as TRL), over every rollout batch of one update on all ranks (TRL: per rank).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatrl.rl import (dpo_loss, dschat_pairwise_loss, gae_advantages, kl_penalty, kl_shaped_rewards,
                       policy_loss, value_loss, whiten)

B, R, P = 5, 12, 4                            # rows, response length, prompt width
LENGTHS = torch.tensor([12, 7, 3, 1, 10])     # counted response tokens (chatrl: EOS included)
ENDED = torch.tensor([False, True, True, True, True])  # row 0 hit the length limit: no EOS
GAMMA, LAM, KL_COEF, CLIP = 1.0, 0.95, 0.1, 5.0
TOL = dict(atol=1e-6, rtol=1e-6)


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture(scope="module")
def data():
    """Response-aligned [B, R] tensors; chatrl's action mask counts LENGTHS[b] tokens."""
    idx = torch.arange(R).expand(B, R)
    mask = (idx < LENGTHS[:, None]).float()
    return dict(
        mask=mask,
        logprobs=-rand(B, R, seed=1).abs() - 0.1,
        ref_logprobs=-rand(B, R, seed=2).abs() - 0.1,
        old_logprobs=-rand(B, R, seed=3).abs() - 0.1,
        values=rand(B, R, seed=4, scale=0.5),
        new_values=rand(B, R, seed=5, scale=0.5),
        scores=torch.tensor([7.0, -0.3, 1.2, -6.5, 0.4]),  # two beyond the +-5 clip
        advantages=rand(B, R, seed=6),
        returns=rand(B, R, seed=7),
    )


def close(actual, expected, where=None):
    if where is not None:
        actual, expected = actual[where.bool()], expected[where.bool()]
    torch.testing.assert_close(actual, expected, **TOL)


# ============================================================================ DeepSpeed-Chat

def ref_dschat_rewards(prompts_width, log_probs, ref_log_probs, reward_score, action_mask, kl_ctl, clip):
    """compute_rewards: -kl_ctl * (logp - ref) everywhere, + the clipped score at index
    ends - 1 with ends = start + action_mask[:, start:].sum(1) + 1 (full-sequence layout)."""
    rewards = -kl_ctl * (log_probs - ref_log_probs)
    start = prompts_width - 1
    ends = start + action_mask[:, start:].sum(1).long() + 1
    score = reward_score.clamp(-clip, clip)
    for j in range(rewards.shape[0]):
        last = min(int(ends[j]), rewards.shape[1]) - 1
        rewards[j, last] += score[j]
    return rewards, ends


def ref_dschat_gae(values, rewards, start, gamma, lam):
    """get_advantages_and_returns: the GAE recursion from `start` to the end of the sequence."""
    length = rewards.shape[-1]
    lastgaelam, reversed_adv = 0.0, []
    for t in reversed(range(start, length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values[:, start:]


def ref_dschat_actor_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2):
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return (torch.max(loss1, loss2) * mask).sum() / mask.sum()


def ref_dschat_critic_loss(values, old_values, returns, mask, cliprange_value=0.2):
    clipped = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    return 0.5 * (torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum() / mask.sum()


def dschat_layout(d):
    """DeepSpeed-Chat's full-sequence tensors [B, P - 1 + R] (log-prob i scores token i + 1) and
    its action mask attention_mask[:, 1:]: with pad == EOS its attention mask is 0 on the EOS,
    so a row that ended counts LENGTHS - 1 tokens there."""
    def full(x, fill=0.0):
        return torch.cat([torch.full((B, P - 1), fill), x], dim=1)

    counted = LENGTHS - ENDED.long()
    ds_mask = (torch.arange(R).expand(B, R) < counted[:, None]).float()
    return full, full(ds_mask, 1.0), ds_mask


def test_dschat_rewards_gae_returns(data):
    """With DeepSpeed-Chat's mask (EOS not counted, pad == EOS), its score lands one past the
    last counted token, i.e. on the EOS, which is exactly where chatrl (EOS counted) puts it.
    After DeepSpeed-Chat zeroes rewards and values from `ends` on, its rewards, advantages and
    returns over the response equal chatrl's on chatrl's mask, everywhere."""
    full, ds_action_mask, _ = dschat_layout(data)
    start = P - 1
    rewards, ends = ref_dschat_rewards(P, full(data["logprobs"]), full(data["ref_logprobs"]),
                                       data["scores"], ds_action_mask, KL_COEF, CLIP)
    old_values = full(data["values"])
    for i in range(B):  # train_rlhf: "zero out the reward and value after the end"
        rewards[i, ends[i]:] = 0
        old_values[i, ends[i]:] = 0
    ds_adv, ds_ret = ref_dschat_gae(old_values, rewards, start, GAMMA, LAM)

    ours = kl_shaped_rewards(data["logprobs"], data["ref_logprobs"], data["scores"], data["mask"],
                             kl_coef=KL_COEF, clip_reward=CLIP)
    close(ours, rewards[:, start:])
    adv, ret = gae_advantages(ours, data["values"], data["mask"], GAMMA, LAM)
    close(adv, ds_adv)
    close(ret, ds_ret)
    # DeepSpeed-Chat does not whiten advantages (chatrl does by default; --whiten-advantages false
    # gives DeepSpeed-Chat's advantages above).


def test_dschat_actor_and_critic_losses(data):
    """Same token-mean convention. DeepSpeed-Chat's own mask leaves the EOS out (pad == EOS);
    given the same mask, the losses are equal."""
    _, _, ds_mask = dschat_layout(data)
    for mask in (data["mask"], ds_mask):
        ours, _ = policy_loss(data["logprobs"], data["old_logprobs"], data["advantages"], mask, 0.2)
        close(ours, ref_dschat_actor_loss(data["logprobs"], data["old_logprobs"], data["advantages"], mask))
        ours, _ = value_loss(data["new_values"], data["values"], data["returns"], mask, 0.2)
        close(ours, ref_dschat_critic_loss(data["new_values"], data["values"], data["returns"], mask))


def ref_dschat_reward_loss(chosen_ids, rejected_ids, chosen_values, rejected_values, pad_id):
    """RewardModel.forward (num_padding_at_beginning 0): per pair, mean of -log sigmoid(c - r)
    over [first divergence, max(first pad of each)); end scores at the token before the first pad."""
    loss, c_end, r_end = 0.0, [], []
    seq_len = chosen_ids.shape[1]
    for c_id, r_id, c_v, r_v in zip(chosen_ids, rejected_ids, chosen_values, rejected_values):
        c_pads = (c_id == pad_id).nonzero()
        c_ind = int(c_pads[0]) if len(c_pads) else seq_len
        diverge = (c_id != r_id).nonzero()
        if len(diverge) == 0:
            end_ind, div_ind, r_ind = seq_len, seq_len - 1, c_ind
        else:
            r_pads = (r_id == pad_id).nonzero()
            r_ind = int(r_pads[0]) if len(r_pads) else seq_len
            end_ind, div_ind = max(c_ind, r_ind), int(diverge[0])
        loss = loss - F.logsigmoid(c_v[div_ind:end_ind] - r_v[div_ind:end_ind]).mean()
        c_end.append(c_v[c_ind - 1])
        r_end.append(r_v[r_ind - 1])
    c_end, r_end = torch.stack(c_end), torch.stack(r_end)
    return loss / chosen_ids.shape[0], (c_end > r_end).float().mean()


def test_dschat_reward_loss():
    """chatrl's --rm-loss dschat equals DeepSpeed-Chat's on pairs that differ and on an identical
    pair without padding. (For an identical padded pair DeepSpeed-Chat scores the last padded
    position; chatrl the last real token: the documented difference, not compared here.)"""
    pad, T = 0, 9
    lengths_c, lengths_r = [9, 5, 7, 3], [6, 8, 7, 9]
    chosen = torch.randint(1, 50, (4, T), generator=torch.Generator().manual_seed(8))
    rejected = chosen.clone()
    rejected[0, 3:] = torch.randint(50, 99, (T - 3,), generator=torch.Generator().manual_seed(9))
    rejected[1, 4:] += 50
    rejected[2, 6] += 50
    rejected[3] = chosen[3]
    lengths_r[3] = lengths_c[3] = T  # identical pair, no padding
    for row, (lc, lr) in enumerate(zip(lengths_c, lengths_r)):
        chosen[row, lc:] = pad
        rejected[row, lr:] = pad
    cv, rv = rand(4, T, seed=10), rand(4, T, seed=11)
    want_loss, want_acc = ref_dschat_reward_loss(chosen, rejected, cv, rv, pad)
    loss, acc = dschat_pairwise_loss(cv, rv, chosen, rejected, pad)
    close(loss, want_loss)
    close(acc, want_acc)


# ============================================================================ TRL

INVALID_LOGPROB = 1.0


def ref_trl_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def ref_trl_masked_whiten(x, mask, shift_mean=True):
    mean = ref_trl_masked_mean(x, mask)
    var = ref_trl_masked_mean((x - mean) ** 2, mask)
    var = var * mask.sum() / (mask.sum() - 1)  # Bessel's correction
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def ref_trl_experience(logprobs, ref_logprobs, values, scores, sequence_lengths, kl_coef, gamma, lam,
                       estimator="k1"):
    """PPOTrainer's steps 3-6: masks from sequence_lengths (index of the last kept token), KL
    rewards, the score at sequence_lengths + 1 when it exists, GAE, whitened advantages."""
    idx = torch.arange(logprobs.shape[1]).expand_as(logprobs)
    padding_mask = idx > sequence_lengths[:, None]
    padding_mask_p1 = idx > (sequence_lengths + 1)[:, None]
    logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    values = values.masked_fill(padding_mask_p1, 0)
    logr = ref_logprobs - logprobs
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
    rewards = -kl_coef * kl
    end = torch.where(sequence_lengths + 1 < rewards.shape[1], sequence_lengths + 1, sequence_lengths)
    rewards[torch.arange(rewards.shape[0]), end] += scores
    lastgaelam, reversed_adv = 0.0, []
    n = rewards.shape[1]
    for t in reversed(range(n)):
        nextvalues = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    advantages = ref_trl_masked_whiten(advantages, (~padding_mask).float()).masked_fill(padding_mask, 0)
    return dict(rewards=rewards, advantages=advantages, returns=returns, values=values,
                padding_mask=padding_mask, padding_mask_p1=padding_mask_p1)


def ref_trl_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, padding_mask,
                   padding_mask_p1, cliprange=0.2, cliprange_value=0.2):
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = ref_trl_masked_mean(pg, (~padding_mask).float())
    vclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf = torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2)
    return pg_loss, 0.5 * ref_trl_masked_mean(vf, (~padding_mask_p1).float())


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_trl_experience(data, estimator):
    """TRL scores the position AFTER the last kept token (the first pad after the EOS) and
    bootstraps from the critic's value there (padding_mask_p1); chatrl scores the EOS itself. With
    chatrl's mask extended by that one position, no KL on it (TRL fills both log-probs with
    INVALID_LOGPROB there) and no score clipping (TRL has none), chatrl's functions give TRL's
    rewards, returns and whitened advantages exactly: the score's position is the only
    difference."""
    seq_len = LENGTHS - 1
    trl = ref_trl_experience(data["logprobs"], data["ref_logprobs"], data["values"], data["scores"],
                             seq_len, KL_COEF, GAMMA, LAM, estimator)
    mask, mask_p1 = (~trl["padding_mask"]).float(), (~trl["padding_mask_p1"]).float()
    assert torch.equal(mask, data["mask"])
    logprobs = torch.where(trl["padding_mask"], data["ref_logprobs"], data["logprobs"])
    rewards = kl_shaped_rewards(logprobs, data["ref_logprobs"], data["scores"], mask_p1,
                                kl_coef=KL_COEF, clip_reward=None, estimator=estimator)
    close(rewards, trl["rewards"])
    adv, ret = gae_advantages(rewards, data["values"], mask_p1, GAMMA, LAM)
    close(ret, trl["returns"])
    close(whiten(adv, mask), trl["advantages"])
    # the difference is real: chatrl's own layout (score on the EOS) gives other advantages
    ours = kl_shaped_rewards(data["logprobs"], data["ref_logprobs"], data["scores"], data["mask"],
                             kl_coef=KL_COEF, clip_reward=None, estimator=estimator)
    own = whiten(gae_advantages(ours, data["values"], data["mask"], GAMMA, LAM)[0], data["mask"])
    assert (own - trl["advantages"]).abs().max() > 1e-2


def test_trl_policy_and_value_losses(data):
    """Same clipped objectives and token means; TRL's value loss also covers its extra
    position after the EOS (padding_mask_p1), so chatrl gets that mask for the comparison."""
    trl = ref_trl_experience(data["logprobs"], data["ref_logprobs"], data["values"], data["scores"],
                             LENGTHS - 1, KL_COEF, GAMMA, LAM)
    mask, mask_p1 = (~trl["padding_mask"]).float(), (~trl["padding_mask_p1"]).float()
    pg_want, vf_want = ref_trl_losses(data["logprobs"], data["old_logprobs"], data["advantages"],
                                      data["new_values"], data["values"], data["returns"],
                                      trl["padding_mask"], trl["padding_mask_p1"])
    close(policy_loss(data["logprobs"], data["old_logprobs"], data["advantages"], mask, 0.2)[0], pg_want)
    close(value_loss(data["new_values"], data["values"], data["returns"], mask_p1, 0.2)[0], vf_want)


def test_trl_whiten_equals_chatrl_whiten(data):
    x = rand(B, R, seed=12, scale=3.0) + 1.5
    for shift_mean in (True, False):
        close(whiten(x, data["mask"], shift_mean=shift_mean),
              ref_trl_masked_whiten(x, data["mask"], shift_mean=shift_mean), where=data["mask"])
    # chatrl also zeroes the entries off the mask (TRL leaves them)
    assert (whiten(x, data["mask"])[data["mask"] == 0] == 0).all()


def ref_dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing):
    """TRL DPOTrainer (loss_type sigmoid) and OpenRLHF DPOLoss: the same equation."""
    logits = (pc - pr) - (rc - rr)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    return (losses.mean(), chosen_rewards.mean(), rejected_rewards.mean(),
            (chosen_rewards > rejected_rewards).float().mean(), (chosen_rewards - rejected_rewards).mean())


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_loss(beta, label_smoothing):
    pc, pr, rc, rr = (rand(16, seed=s, scale=20.0) - 60.0 for s in (13, 14, 15, 16))
    loss, st = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    want = ref_dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing)
    got = (loss, st["chosen_rewards"], st["rejected_rewards"], st["reward_accuracy"], st["margin"])
    for g, w in zip(got, want):
        close(g, w)


# ============================================================================ OpenRLHF

def ref_openrlhf_kl(log_probs, log_probs_base, estimator):
    log_ratio = log_probs.float() - log_probs_base.float()
    if estimator == "k2":
        return log_ratio ** 2 / 2.0
    if estimator == "k3":
        log_ratio = -log_ratio
        return log_ratio.exp() - 1 - log_ratio
    return log_ratio


def ref_openrlhf_reward(r, kl_coef, kl, action_mask, clip_range):
    r = r.clamp(min=clip_range[0], max=clip_range[1])
    eos = action_mask.shape[1] - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last = torch.zeros_like(kl).scatter_(1, eos, r.unsqueeze(1).to(kl.dtype))
    return last - kl_coef * kl


def ref_openrlhf_gae(values, rewards, action_mask, gamma, lambd):
    values, rewards = action_mask * values, action_mask * rewards
    lastgaelam, reversed_adv = 0.0, []
    n = rewards.shape[1]
    for t in reversed(range(n)):
        nextvalues = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def ref_openrlhf_masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def ref_openrlhf_policy_loss(log_probs, old_log_probs, advantages, action_mask, eps=0.2, token_level=True):
    ratio = (log_probs - old_log_probs).exp()
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    return (ref_openrlhf_masked_mean(loss, action_mask) if token_level
            else ref_openrlhf_masked_mean(loss, action_mask, dim=-1).mean())


def ref_openrlhf_value_loss(values, old_values, returns, action_mask, eps=0.2, token_level=True):
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    loss = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
    loss = (ref_openrlhf_masked_mean(loss, action_mask) if token_level
            else ref_openrlhf_masked_mean(loss, action_mask, dim=-1).mean())
    return 0.5 * loss


def ref_openrlhf_normalize(advantages, action_mask):
    """Advantage normalisation of the experience maker: biased variance, floored at 1e-8."""
    n = action_mask.sum()
    mean = (advantages * action_mask).sum() / n
    var = ((advantages - mean).pow(2) * action_mask).sum() / n
    return (advantages - mean) * var.clamp(min=1e-8).rsqrt(), var


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_kl_rewards_gae(data, estimator):
    """The same rewards on the response tokens (OpenRLHF leaves -kl_coef * kl on the padding, which
    its GAE masks away; chatrl writes 0 there) and the same advantages and returns everywhere."""
    kl = ref_openrlhf_kl(data["logprobs"], data["ref_logprobs"], estimator)
    close(kl_penalty(data["logprobs"], data["ref_logprobs"], estimator), kl)
    want = ref_openrlhf_reward(data["scores"], KL_COEF, kl, data["mask"], (-CLIP, CLIP))
    ours = kl_shaped_rewards(data["logprobs"], data["ref_logprobs"], data["scores"], data["mask"],
                             kl_coef=KL_COEF, clip_reward=CLIP, estimator=estimator)
    close(ours, want, where=data["mask"])
    assert (ours[data["mask"] == 0] == 0).all()
    want_adv, want_ret = ref_openrlhf_gae(data["values"], want, data["mask"], GAMMA, LAM)
    adv, ret = gae_advantages(ours, data["values"], data["mask"], GAMMA, LAM)
    close(adv, want_adv)
    close(ret, want_ret)


def test_openrlhf_losses_token_and_sequence_level(data):
    """Token level (OpenRLHF's default) is chatrl's convention: equal. Sequence level averages the
    per-sequence means; chatrl's token mean is those means weighted by each row's token count."""
    m = data["mask"]
    pg, _ = policy_loss(data["logprobs"], data["old_logprobs"], data["advantages"], m, 0.2)
    vf, _ = value_loss(data["new_values"], data["values"], data["returns"], m, 0.2)
    close(pg, ref_openrlhf_policy_loss(data["logprobs"], data["old_logprobs"], data["advantages"], m))
    close(vf, ref_openrlhf_value_loss(data["new_values"], data["values"], data["returns"], m))
    n = m.sum(1)
    rows_pg = torch.stack([ref_openrlhf_policy_loss(data["logprobs"][i:i + 1], data["old_logprobs"][i:i + 1],
                                                    data["advantages"][i:i + 1], m[i:i + 1], token_level=False)
                           for i in range(B)])
    rows_vf = torch.stack([ref_openrlhf_value_loss(data["new_values"][i:i + 1], data["values"][i:i + 1],
                                                   data["returns"][i:i + 1], m[i:i + 1], token_level=False)
                           for i in range(B)])
    close(pg, (rows_pg * n).sum() / n.sum())
    close(vf, (rows_vf * n).sum() / n.sum())
    seq_pg = ref_openrlhf_policy_loss(data["logprobs"], data["old_logprobs"], data["advantages"], m,
                                      token_level=False)
    close(seq_pg, rows_pg.mean())
    assert abs(seq_pg - pg) > 1e-3  # unequal lengths: the two conventions really differ


def test_openrlhf_advantage_normalisation(data):
    """OpenRLHF: (A - mean) / sqrt(max(var_biased, 1e-8)); chatrl: (A - mean) / sqrt(var_unbiased
    + 1e-8). Same centre; scales differ by sqrt(var_biased / (var_unbiased + 1e-8)), about
    sqrt((n - 1) / n) for n tokens. Scope: both normalise over the whole update on all ranks
    (chatrl via summed moments, see test_rl_masks); whitening one tensor covers both here."""
    m = data["mask"]
    a = data["advantages"] * 2.0 + 0.7
    want, var_b = ref_openrlhf_normalize(a, m)
    n = m.sum()
    var_u = var_b * n / (n - 1)
    close(whiten(a, m), want * torch.sqrt(var_b / (var_u + 1e-8)), where=m)
