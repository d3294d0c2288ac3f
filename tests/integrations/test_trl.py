"""Bebop's rollout function inside TRL's GRPOTrainer: it decodes with the trainer's current policy and settings,
returns the target's log-probs of the emitted tokens (a fresh full forward's), keeps the head frozen, logs its
decode metrics, and refuses sampling settings the engine cannot reproduce exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import build_tiny_policy
from laws import P_FALSE_ALARM, chisq_pvalue, exact_logprobs

from bebop.core.sampling import SamplingParams
from bebop.errors import BebopError
from bebop.integrations.trl import BebopRollout, mtp_rollout_func, sampling_params
from bebop.models.mtp import MTPHead

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PROMPTS = ["Q: 1+2\n", "Q: 3*4\n", "Q: 5-1\n", "Q: 7+7\n"]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=12, temperature=1.0, top_p=0.95, top_k=0, learning_rate=1e-2, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                beta=0.0, seed=0, bf16=False)
    base.update(kw)
    return trl.GRPOConfig(**base)


def _reward(prompts, completions, **kw):
    return [float(len(c)) / 10 for c in completions]


def test_rollouts_follow_the_trainers_current_policy(tiny_tokenizer, tmp_path):
    """Two GRPO steps with a large learning rate: each call's log-probs equal a fresh full forward of the policy as
    it is at that call (so the second call decodes with the updated weights), under the trainer's τ and top-p."""
    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=3.0)
    head = MTPHead.from_base(model)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    rollout = mtp_rollout_func(head, gamma=3, seed=0)
    calls = []

    def recorded(prompts, trainer):
        out = rollout(prompts, trainer)
        params = sampling_params(trainer.args)
        fresh = [exact_logprobs(trainer.model, p, c, params).tolist()
                 for p, c in zip(out["prompt_ids"], out["completion_ids"], strict=True)]
        calls.append((list(prompts), out, fresh, trainer.model.get_input_embeddings().weight.detach().clone()))
        return out

    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path), train_dataset=ds,
                              processing_class=tiny_tokenizer, rollout_func=recorded)
    trainer.train()

    assert len(calls) == 2
    assert not torch.equal(calls[0][3], calls[1][3])                     # the policy moved between the calls
    for prompts, out, fresh, _ in calls:
        assert len(prompts) == 8 and prompts[0] == prompts[3]              # each prompt repeated num_generations
        assert len(out["completion_ids"]) == len(out["logprobs"]) == 8
        for lp, ref, comp in zip(out["logprobs"], fresh, out["completion_ids"], strict=True):
            assert len(lp) == len(comp) >= 1
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref), atol=2e-4, rtol=0)
    for k, v in head.state_dict().items():                                # the head's own weights stay frozen
        assert torch.equal(v, head_before[k])
    assert all(not p.requires_grad for p in head.parameters())
    logged = [h for h in trainer.state.log_history if "bebop/accept_length" in h]
    assert len(logged) == 2 and all(1.0 <= h["bebop/accept_length"] <= 4.0 for h in logged)
    assert "bebop/alpha_3" in logged[0] and logged[0]["bebop/tokens_per_s"] > 0
    assert len(rollout.history) == 2


class Stub:
    """The attributes of a GRPOTrainer that the rollout function reads."""

    def __init__(self, model, tok, args):
        self.model, self.processing_class, self.args = model, tok, args

    def _tokenize_prompts(self, prompts):
        return [self.processing_class(p)["input_ids"] for p in prompts], None, {}


@pytest.mark.parametrize("with_head", [True, False], ids=["mtp", "plain"])
def test_logprobs_equal_the_trainers_own_recomputation(tiny_tokenizer, tmp_path, with_head):
    """At τ = 1 without top-p/top-k (where TRL's per-token log-probs and the sampling law coincide), the returned
    log-probs equal what GRPOTrainer itself computes for the policy, to 1e-4 in float32; the policy's weights
    change over two steps and rewards reach the reward function."""
    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=3.0)
    weights_before = model.get_input_embeddings().weight.detach().clone()
    rollout = BebopRollout(MTPHead.from_base(model) if with_head else None, gamma=3, seed=0)
    checked, rewarded = [], []

    def recorded(prompts, trainer):
        out = rollout(prompts, trainer)
        rows = [p + c for p, c in zip(out["prompt_ids"], out["completion_ids"], strict=True)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        keep = width - min(map(len, out["prompt_ids"]))
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
        for i, (p, lp) in enumerate(zip(out["prompt_ids"], out["logprobs"], strict=True)):
            start = len(p) - (width - keep)
            checked.append(float((torch.tensor(lp) - logps[i, start:start + len(lp)]).abs().max()))
        return out

    def reward(prompts, completions, **kw):
        rewarded.append(len(completions))
        return [float(len(c)) / 10 for c in completions]

    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=_config(tmp_path, top_p=1.0), train_dataset=ds,
                              processing_class=tiny_tokenizer, rollout_func=recorded)
    trainer.train()
    assert len(checked) == 16 and max(checked) < 1e-4
    assert rewarded == [8, 8]
    assert not torch.equal(weights_before, model.get_input_embeddings().weight)


@pytest.mark.slow
def test_first_token_follows_plain_sampling(tiny_tokenizer, tmp_path):
    """10^5 rollouts of one prompt at τ = 0.8, top-p 0.9 through the rollout function: the first completion token's
    counts against the exact law under the same transforms (χ²)."""
    from bebop.core.sampling import probs_from_logits

    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=6.0)
    rollout = BebopRollout(MTPHead.from_base(model), gamma=3, seed=7)
    args = _config(tmp_path, temperature=0.8, top_p=0.9, max_completion_length=2)
    n = 100_000
    out = rollout([PROMPTS[0]] * n, Stub(model, tiny_tokenizer, args))
    first = np.array([c[0] for c in out["completion_ids"]])
    prompt = tiny_tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        law = probs_from_logits(model(torch.tensor([prompt])).logits[0, -1], sampling_params(args))
    assert chisq_pvalue(first, law.double().numpy()) > P_FALSE_ALARM


def test_a_head_that_does_not_fit_the_model_is_refused(tiny_tokenizer, tmp_path):
    from bebop.models.policy import ModelConfig, build_policy

    model = build_tiny_policy(tiny_tokenizer, seed=1)
    other = build_policy(ModelConfig(num_layers=2, hidden_size=48, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64), tiny_tokenizer)
    rollout = BebopRollout(MTPHead.from_base(other), gamma=3)
    with pytest.raises(BebopError, match="hidden size 48"):
        rollout(PROMPTS, Stub(model, tiny_tokenizer, _config(tmp_path)))


def test_completions_stop_at_eos_and_include_it(tiny_tokenizer, tmp_path):
    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=3.0)
    rollout = BebopRollout(MTPHead.from_base(model), gamma=2, seed=0)
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():                                # make EOS likely after any token
        model.get_output_embeddings().weight[eos] += 0.5 * model.get_output_embeddings().weight.mean(0)

    out = rollout(PROMPTS * 8, Stub(model, tiny_tokenizer, _config(tmp_path, max_completion_length=40, top_p=1.0)))
    ends = [c for c in out["completion_ids"] if eos in c]
    assert ends and all(c.index(eos) == len(c) - 1 for c in ends)           # EOS ends a completion, included
    assert all(len(c) <= 40 for c in out["completion_ids"])


def test_gamma_auto_calibrates_once_and_decodes(tiny_tokenizer, tmp_path):
    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=3.0)
    rollout = BebopRollout(MTPHead.from_base(model), gamma="auto", gamma_max=3, seed=0)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward, args=_config(tmp_path, max_steps=1),
                              train_dataset=ds, processing_class=tiny_tokenizer, rollout_func=rollout)
    trainer.train()
    assert rollout._policy is not None and len(rollout.history) == 1


@pytest.mark.parametrize(("field", "value", "match"), [("repetition_penalty", 1.1, "repetition_penalty 1.1"),
                                                         ("min_p", 0.05, "min_p 0.05")])
def test_settings_the_engine_cannot_reproduce_are_refused(tmp_path, field, value, match):
    with pytest.raises(BebopError, match=match):
        sampling_params(_config(tmp_path, **{field: value}))


def test_sampling_settings_map_one_to_one(tmp_path):
    assert sampling_params(_config(tmp_path, temperature=0.7, top_p=0.9, top_k=20)) == \
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    assert sampling_params(_config(tmp_path, temperature=1.0, top_p=1.0, top_k=0)) == SamplingParams(1.0)


def test_bad_gamma_is_refused():
    with pytest.raises(BebopError, match="gamma must be"):
        BebopRollout("unused", gamma=0)


def test_multi_turn_rollouts_mark_environment_tokens(tiny_tokenizer, tmp_path):
    """A row that emits the stop token gets the environment's reply prefilled; env_mask marks the reply 0, its
    log-probs are 0, and the model's tokens keep a fresh full forward's log-probs over the whole transcript. A real
    GRPOTrainer step accepts the env_mask."""
    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=3.0)
    prompt_ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        stop = int(model(torch.tensor([prompt_ids])).logits[0, -1].argmax())     # the likeliest first token
    reply = tiny_tokenizer("= 3\n", add_special_tokens=False)["input_ids"]
    seen = []

    def env(prompt, transcript):
        seen.append(prompt)
        return reply if len(seen) < 50 else None

    args = _config(tmp_path, top_p=1.0, max_completion_length=24, max_steps=1)
    rollout = BebopRollout(MTPHead.from_base(model), gamma=3, seed=0, env=env, stop=stop, max_turns=2)
    out = rollout(PROMPTS * 4, Stub(model, tiny_tokenizer, args))
    masks = out["env_mask"]
    assert seen and set(seen) <= set(PROMPTS)
    assert any(0 in m for m in masks)
    params = sampling_params(args)
    for p, c, lp, m in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"], masks, strict=True):
        assert len(c) == len(lp) == len(m)
        ref = exact_logprobs(model, p, c, params)
        model_tok = torch.tensor(m, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(lp)[model_tok], ref[model_tok], atol=2e-4, rtol=0)
        assert all(x == 0.0 for x, k in zip(lp, m, strict=True) if not k)
        for i in (i for i, k in enumerate(m) if not k):                  # environment tokens are the reply's
            assert c[i] in reply

    seen.clear()
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds,
                              processing_class=tiny_tokenizer,
                              rollout_func=BebopRollout(MTPHead.from_base(model), seed=0, env=env, stop=stop))
    trainer.train()
    assert seen


def test_multi_turn_needs_env_and_stop():
    with pytest.raises(BebopError, match="need both env= and stop="):
        BebopRollout("unused", env=lambda p, t: None)
