"""Stage 4 (update) of step 3 on a fixed global batch, on 1 rank or under the DeepSpeed launcher,
for tests/e2e/test_grpo.py's rank-equality test.

    python rl_update_equality.py OUT.json ACTOR ZERO_STAGE:AGGREGATION [ZERO_STAGE:AGGREGATION ...]
    deepspeed --num_gpus 2 rl_update_equality.py OUT.json ACTOR ZERO_STAGE:AGGREGATION [...]

The global batch: 2 prompts x 4 answers (GRPO groups) of fixed tokens, answer lengths 1-7 so the
ranks hold very different token counts (rank 0 the long answers); old log-probs are the actor's
own, shifted so the clip acts; reference log-probs shifted the other way (k3 KL in the loss).
Each rank takes its half of the rows (whole groups) and runs chatrl.steps.ppo.update_epochs for 2
updates. Rank 0 writes, per aggregation, the logged global losses of both updates and a
fingerprint of the actor after them. Each ZERO_STAGE:AGGREGATION pair builds its own models in
the same process (one start-up for all of them).
"""

import json
import sys

import torch

from chatrl.config import RLConfig
from chatrl.engine import ds
from chatrl.models import load_tokenizer
from chatrl.rl import group_advantages, sequence_to_tokens
from chatrl.steps import stages
from chatrl.steps.ppo import Experience, PPOTrainer, build_models, update_epochs


def global_batch(tok, device):
    P, R, B = 6, 7, 8
    g = torch.Generator().manual_seed(0)
    lengths = [7, 6, 7, 5, 1, 2, 1, 3]  # rows 0-3 (rank 0 of 2) long, rows 4-7 short
    prompt = torch.randint(10, 200, (B, P), generator=g)
    answer = torch.randint(10, 200, (B, R), generator=g)
    act = (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).float()
    answer = torch.where(act.bool(), answer, torch.full_like(answer, tok.pad_token_id))
    seq = torch.cat([prompt, answer], 1).to(device)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), act.long()], 1).to(device)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    adv = sequence_to_tokens(group_advantages(scores, 4), act).to(device)
    return seq, mask, act.to(device), P, scores.to(device), adv


@ds.releases_engines  # as a step does: the next setting builds its models from scratch
def one_setting(actor, zero_stage, aggregation):
    world, rank = ds.world_size(), ds.rank()
    torch.manual_seed(0)
    tok = load_tokenizer(actor, padding_side="left")
    cfg = RLConfig(actor_model_name_or_path=actor, output_dir="unused", algo="grpo",
                   num_generations=4, per_device_generation_batch_size=2 // world,
                   per_device_training_batch_size=8 // world, actor_zero_stage=int(zero_stage),
                   actor_learning_rate=1e-3, actor_dropout=0.0, kl_coef=0.05, dtype="fp32",
                   loss_aggregation=aggregation, reward_fn=["exact"])
    models = build_models(cfg, tok, 10, "fp32")
    trainer = PPOTrainer(models, cfg, sources=[], weights=[])
    dev = trainer.device
    seq, mask, act, P, scores, adv = global_batch(tok, dev)
    with torch.no_grad():
        own = stages.forward_logprobs(models.actor, seq, mask, P, 1.0, dev) * act
        ref = stages.forward_logprobs(models.ref, seq, mask, P, 1.0, dev) * act
    shift = torch.linspace(-0.4, 0.4, act.shape[1], device=dev)[None, :] * act
    rows = torch.arange(8)[rank * 8 // world:(rank + 1) * 8 // world]
    full = Experience(seq, mask, act, P, (own + shift) * act, (ref - shift) * act, None, scores,
                      torch.zeros_like(act), adv, adv, group_size=4)
    exp = full.select(rows.to(dev))
    losses = []
    for _ in range(2):
        stats, _ = update_epochs(trainer, [exp])
        losses.append(stats[-1]["loss/actor_global"])
    state = ds.full_state_dict(models.actor.module)
    fp = {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in state.items()}
    return {"world": world, "zero_stage": int(zero_stage), "losses": losses, "fingerprint": fp}


def main(out, actor, *settings):
    ds.init_distributed()
    results = {}
    for setting in settings:
        zero_stage, aggregation = setting.split(":")
        results[aggregation] = one_setting(actor, zero_stage, aggregation)
        ds.barrier()
    if ds.rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    ds.barrier()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
