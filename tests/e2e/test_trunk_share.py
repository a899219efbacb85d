"""Step 3 with frozen lower blocks: sharing the frozen trunk (the actor's recorded in the fp32
rollout and replayed by the reference forward, the critic's in the reward model's forward; both
replayed by every PPO epoch) must not change what is learned. Two trainers
built alike, one with --share-frozen-trunk (the default) and one without, run the same two PPO
iterations of two epochs from the same seed: the same losses, statistics and final weights."""

from __future__ import annotations

import pytest
import torch

from ppo_helpers import init_in_process, one_thread
from test_dropout import prompt_batch


def same_storage(a, b) -> set[str]:
    """Names of the parameters of models a and b that share one tensor."""
    from chatrl.models.load import unwrap

    pa, pb = (dict(unwrap(getattr(m, "module", m)).named_parameters()) for m in (a, b))
    return {n for n in pa if n in pb and pa[n].data_ptr() == pb[n].data_ptr()}


def run(tmp_path, share: bool, recompute: bool = False):
    from chatrl.config import PPOConfig
    from chatrl.models import load_tokenizer, resolve_model_path
    from chatrl.steps.ppo import PPOTrainer, build_models, update_epochs

    path = resolve_model_path("tiny-llama")
    cfg = PPOConfig(actor_model_name_or_path=path, critic_model_name_or_path=path,
                    output_dir=str(tmp_path / str(share)), per_device_generation_batch_size=4,
                    per_device_training_batch_size=2, ppo_epochs=2, max_answer_seq_len=8,
                    num_warmup_steps=0, dtype="fp32", allow_untrained_reward_head=True,
                    actor_learning_rate=1e-3, critic_learning_rate=1e-3,
                    actor_num_layers_unfrozen=1, critic_num_layers_unfrozen=1,
                    share_frozen_trunk=share, recompute_old_logprobs=recompute)
    tok = load_tokenizer(path, padding_side="left")
    torch.manual_seed(0)
    models = build_models(cfg, tok, 10, "fp32")
    trainer = PPOTrainer(models, cfg)
    batch = prompt_batch(tok, ["Tell me about the ocean.", "Hi", "What do you think of rain?",
                               "Describe a tall mountain."])
    from chatrl.models.freeze import transformer_blocks
    from chatrl.models.load import unwrap

    # calls of the actor's lowest (frozen) block's MLP while making each experience (the
    # training forwards after it skip the block with the shared trunk: not counted here)
    count, calls = [0], []
    first = next(iter(transformer_blocks(unwrap(models.actor.module))))
    first.mlp.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    # and of the reference model's: with the shared trunk recorded in the (fp32) rollout, the
    # reference forward starts at the first trained block too
    ref_count, ref_calls = [0], []
    ref_first = next(iter(transformer_blocks(unwrap(models.ref.module if hasattr(models.ref, "module")
                                                    else models.ref))))
    ref_first.mlp.register_forward_hook(lambda *a: ref_count.__setitem__(0, ref_count[0] + 1))
    stats, trunks = [], []
    torch.manual_seed(1)
    for _ in range(2):
        before, ref_before = count[0], ref_count[0]
        exp = trainer.generate_experience(batch["input_ids"], batch["attention_mask"])
        calls.append(count[0] - before)
        ref_calls.append(ref_count[0] - ref_before)
        trunks.append(sorted(exp.trunk or {}))
        rows, _ = update_epochs(trainer, [exp])
        stats.append([{**r, **{k: v for k, v in trainer.last_stats.items() if k.startswith("rollout/")}}
                      for r in rows])
    weights = {n: p.detach().clone() for m in (models.actor, models.critic)
               for n, p in m.module.named_parameters() if p.requires_grad}
    return trainer, stats, trunks, weights, calls, ref_calls


@pytest.mark.parametrize("recompute", [False, True], ids=["generation-logprobs", "recomputed-logprobs"])
def test_shared_trunk_learns_what_the_full_forward_learns(tmp_path, recompute):
    """With --recompute-old-logprobs (the bf16/fp16 default) the actor's old log-prob forward
    replays the trunk the reference forward recorded: the same old log-probs and gap."""
    init_in_process()
    with one_thread():
        shared, s_stats, s_trunks, s_weights, s_calls, s_ref = run(tmp_path / "s", True, recompute)
        plain, p_stats, p_trunks, p_weights, p_calls, p_ref = run(tmp_path / "p", False, recompute)
    assert s_ref == [0, 0] and p_ref == [1, 1], (s_ref, p_ref)
    # the recompute forward runs the actor's frozen blocks only without the shared trunk
    assert [p - s for p, s in zip(p_calls, s_calls)] == [int(recompute)] * 2, (p_calls, s_calls)
    assert sorted(shared.trunk) == ["actor", "critic"] and plain.trunk == {}
    # the twins' frozen weights are the trained models' tensors (kept once), and only those
    for trainer, share in ((shared, True), (plain, False)):
        m = trainer.models
        for trained, twin in ((m.actor, m.ref), (m.critic, m.reward)):
            same = same_storage(trained, twin)
            if share:
                assert same and all(".layers.0." in n or "embed" in n for n in same), same
                assert any(".layers.0." in n for n in same) and any("embed" in n for n in same), same
            else:
                assert not same, same
    assert s_trunks == [["actor", "critic"]] * 2 and p_trunks == [[], []]
    assert len(s_stats) == len(p_stats) == 2
    for a, b in zip(s_stats, p_stats):
        assert len(a) == len(b) and a
        for ra, rb in zip(a, b):
            keys = ("loss/actor", "loss/critic", "policy/ratio", "policy/approx_kl", "rollout/logprob_gap")
            assert ("rollout/logprob_gap" in ra) == recompute
            for key in keys:
                if key in ra:
                    assert abs(ra[key] - rb[key]) <= 1e-4 + 1e-3 * abs(rb[key]), (key, ra[key], rb[key])
    assert s_weights.keys() == p_weights.keys() and s_weights
    # The actor's trunk states come from the KV-cached rollout, which rounds differently from a
    # full forward (~1e-6): after 8 Adam steps of lr 1e-3 (8e-3 of movement at most) the weights
    # agree to ~1.5e-5 (measured), where Adam scales a near-zero gradient's rounding up.
    for name in s_weights:
        assert torch.allclose(s_weights[name], p_weights[name], atol=5e-5, rtol=1e-4), name
