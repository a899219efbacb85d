"""--num-layers-unfrozen: which parameters train, that the kept ones get the gradients they get
with nothing frozen, that the frozen ones get none, and that bad values are refused."""

from __future__ import annotations

import pytest
import torch

from chatrl.errors import ConfigError
from chatrl.models import load_causal_lm, resolve_model_path
from chatrl.models.freeze import freeze_lower_layers, transformer_blocks
from chatrl.models.lora import apply_lora
from chatrl.models.reward import RewardModel
from chatrl.models.tiny import TINY_ARCHS

from test_models import randomize


def _loss(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.logits if hasattr(out, "logits") else out).float().pow(2).mean()


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_top_block_gets_the_full_models_gradient_and_the_rest_none(arch):
    path = resolve_model_path(f"tiny-{arch}")
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    full = randomize(load_causal_lm(path, dropout=0.0)).train()
    part = randomize(load_causal_lm(path, dropout=0.0)).train()
    _loss(full, ids).backward()
    trainable, total = freeze_lower_layers(part, 1)
    assert 0 < trainable < total
    _loss(part, ids).backward()
    blocks = transformer_blocks(part)
    assert len(blocks) == 2
    top = {id(p) for p in blocks[-1].parameters()}
    emb = part.get_input_embeddings().weight
    assert not emb.requires_grad and emb.grad is None
    assert all(not p.requires_grad and p.grad is None for p in blocks[0].parameters())
    grads_full = dict(full.named_parameters())
    n_checked = 0
    for name, p in part.named_parameters():
        if id(p) in top:
            assert p.requires_grad and p.grad is not None
            assert torch.allclose(p.grad, grads_full[name].grad, atol=1e-6, rtol=1e-4), name
            n_checked += 1
    assert n_checked == len(list(blocks[-1].parameters()))


def test_reward_model_keeps_its_value_head_and_lora_composes(tiny_model_path):
    rm = RewardModel.from_pretrained(tiny_model_path)
    freeze_lower_layers(rm, 0)  # no block trains: the value head and the final norm do
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "v_head.weight" in trainable and not any(".layers." in n for n in trainable)
    lm = apply_lora(load_causal_lm(tiny_model_path), rank=2)
    freeze_lower_layers(lm, 1)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert any("layers.1." in n and "lora_" in n for n in trainable)
    assert not any("layers.0." in n for n in trainable)
    # -1 and a count >= the block count change nothing
    lm = load_causal_lm(tiny_model_path)
    n = sum(p.numel() for p in lm.parameters())
    assert freeze_lower_layers(lm, -1) == (n, n) and freeze_lower_layers(lm, 5) == (n, n)


def test_bad_values_are_one_line_errors(tmp_path):
    from chatrl import config as C

    with pytest.raises(ConfigError, match="num-layers-unfrozen must be -1"):
        C.build_config(C.STEP_CONFIGS["sft"], cli={"output_dir": str(tmp_path)},
                       overrides=["num_layers_unfrozen=-3"])
    with pytest.raises(ConfigError, match="critic-num-layers-unfrozen must be -1"):
        C.build_config(C.STEP_CONFIGS["ppo"], cli={"output_dir": str(tmp_path)},
                       overrides=["critic_num_layers_unfrozen=-2"])
    with pytest.raises(ConfigError, match="cannot find the transformer blocks"):
        freeze_lower_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1)


def test_train_flops_follow_what_is_trained(tiny_model_path):
    from chatrl.engine.flops import matmul_params, train_flops_per_token

    lm = load_causal_lm(tiny_model_path)
    n = matmul_params(lm)
    assert train_flops_per_token(lm) == pytest.approx(6 * n, rel=0.01)  # everything trains
    block = sum(p.numel() for p in transformer_blocks(lm)[-1].parameters())
    freeze_lower_layers(lm, 1)
    # forward over all (2N); input and weight gradients of the top block (2 + 2 per parameter);
    # the tied head is frozen with the embeddings but its input gradient still runs (2 per parameter)
    head = lm.get_output_embeddings().weight.numel()
    assert train_flops_per_token(lm) == pytest.approx(2 * n + 4 * block + 2 * head, rel=0.01)
