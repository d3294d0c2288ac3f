"""The engine: MTP draft→verify emits exactly the plain-sampling law, returns exact log-probs, and greedy
MTP decoding equals plain greedy decoding token for token."""

from __future__ import annotations

import pytest
import torch
from laws import P_FALSE_ALARM, chisq_pvalue, exact_logprobs, prompts_for, sequence_law
from torch.utils._python_dispatch import TorchDispatchMode

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate, generate_mtp
from bebop.errors import BebopError
from bebop.models.mtp import MTPHead


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_mtp_logprobs_match_a_full_forward(peaky, tiny_tokenizer, rule, gamma):
    """Ragged acceptance + cache holes + left padding: every returned log-prob equals a fresh full forward."""
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    params = SamplingParams(temperature=1.0, top_k=20)
    gen = torch.Generator().manual_seed(0)
    r = generate_mtp(model, head, prompts, params, 24, eos_id=None, gamma=gamma, rule=rule, generator=gen)
    assert (r.lengths == 24).all()
    assert r.metrics.accept_length > 1.0  # some drafts were accepted, so holes/rollbacks were exercised
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


def test_plain_logprobs_match_a_full_forward(peaky, tiny_tokenizer):
    model, _ = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 4)
    params = SamplingParams(temperature=0.8)
    r = generate(model, prompts, params, 16, eos_id=None, generator=torch.Generator().manual_seed(0))
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


@pytest.mark.parametrize("rule", ["greedy", "rejection", "target_only"])
def test_greedy_mtp_equals_plain_greedy_token_for_token(peaky, tiny_tokenizer, rule):
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 4)
    params = SamplingParams(temperature=0.0)
    plain = generate(model, prompts, params, 30, eos_id=None)
    mtp = generate_mtp(model, head, prompts, params, 30, eos_id=None, gamma=3, rule=rule)
    assert torch.equal(plain.tokens, mtp.tokens)


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "temperature", "top_p"), [("rejection", 1.0, None), ("target_only", 1.0, 0.9),
                                                            ("rejection", 0.7, 0.9)])
def test_mtp_sequences_have_the_plain_sampling_law(peaky, tiny_tokenizer, rule, temperature, top_p):
    """10^5 sequences of 3 tokens from the MTP engine (γ = 2) against their exact law under p."""
    model, head = peaky
    n, length = 100_000, 3
    prompts, (pa, pb) = prompts_for(tiny_tokenizer, n)
    params = SamplingParams(temperature=temperature, top_p=top_p)
    r = generate_mtp(model, head, prompts, params, length, eos_id=None, gamma=2, rule=rule,
                     generator=torch.Generator().manual_seed(7))
    V = model.config.vocab_size
    codes = (r.tokens[:, 0] * V * V + r.tokens[:, 1] * V + r.tokens[:, 2]).numpy()
    for parity, prompt in ((0, pa), (1, pb)):
        law = sequence_law(model, prompt, params, length)
        assert chisq_pvalue(codes[parity::2], law) > P_FALSE_ALARM


def test_metrics_empirical_alpha_tracks_expected_alpha(peaky, tiny_tokenizer):
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 256)
    r = generate_mtp(model, head, prompts, SamplingParams(), 12, eos_id=None, gamma=3,
                     generator=torch.Generator().manual_seed(3))
    m = r.metrics
    assert len(m.alpha) == len(m.expected_alpha) == 3
    for k in range(3):
        se = (m.expected_alpha[k] * (1 - m.expected_alpha[k]) / m.reached[k]) ** 0.5
        assert abs(m.alpha[k] - m.expected_alpha[k]) < 5 * se + 1e-3
    assert m.tokens == int(r.lengths.sum()) == 256 * 12
    assert m.accept_length == pytest.approx(1 + m.accepted / m.steps)
    assert m.to_dict()["accept_length_counts_bonus"] is True


def test_eos_and_max_tokens_per_row(peaky, tiny_tokenizer):
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 8)
    greedy = generate(model, prompts, SamplingParams(temperature=0.0), 10, eos_id=None)
    eos = int(greedy.tokens[0, 4])  # make row 0's 5th greedy token the "EOS"
    plain = generate(model, prompts, SamplingParams(temperature=0.0), 10, eos_id=eos)
    mtp = generate_mtp(model, head, prompts, SamplingParams(temperature=0.0), 10, eos_id=eos, gamma=3)
    assert torch.equal(plain.lengths, mtp.lengths) and int(mtp.lengths[0]) <= 5
    assert torch.equal(plain.tokens * plain.mask, mtp.tokens * mtp.mask)


def test_bad_gamma_is_rejected(peaky, tiny_tokenizer):
    model, head = peaky
    with pytest.raises(BebopError, match="gamma must be >= 1, got 0"):
        generate_mtp(model, head, [[1, 2]], SamplingParams(), 4, eos_id=None, gamma=0)


def reference_draft_confidences(model, head, prompt: list[int], x: int, gamma: int) -> list[float]:
    """max q_k for k = 1..γ of one draft after ``prompt`` and its first token ``x`` (target-only drafts
    d_k = argmax q_k), by a loop without caches: step k uses MTP layer (k−1) mod L; layer 0 attends to the
    prompt's catch-up entries (tokens shifted by one, the target's hiddens) and its own entries of this draft,
    a layer j > 0 to its own entries of this draft only. Positions are those of the hidden states."""
    P = len(prompt)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hid = model.get_decoder()(input_ids=ids).last_hidden_state
        ctx = {0: (torch.tensor([prompt[1:] + [x]]), hid, torch.arange(P)[None])}
        g = head(*ctx[0])[:, -1:]
        confs = []
        for k in range(1, gamma + 1):
            q = torch.softmax(head.logits(g)[0, -1].float(), -1)
            confs.append(float(q.max()))
            if k == gamma:
                break
            d, layer = q.argmax().view(1, 1), k % head.num_layers
            entry = (d, g, torch.tensor([[P + k - 1]]))
            old = ctx.get(layer)
            ctx[layer] = entry if old is None else tuple(torch.cat([a, b], 1) for a, b in zip(old, entry, strict=True))
            g = head(*ctx[layer], layer=layer)[:, -1:]
    return confs


@pytest.mark.parametrize("backend", ["auto", "transformers"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_multi_layer_head_drafts_step_k_with_layer_k_minus_1_mod_l(peaky, tiny_tokenizer, backend, num_layers):
    """A head of L layers drafts step k with the layer ``MTPHead.unroll`` trains for it, (k−1) mod L: the
    engine's q_k(d_k) equal a reference loop's (layers made to differ, so drafting with layer 0 throughout fails)."""
    model, _ = peaky
    torch.manual_seed(11)
    head = MTPHead.from_base(model, num_layers=num_layers).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    prompt = prompts_for(tiny_tokenizer, 1)[0][0]
    trace: list = []
    r = generate_mtp(model, head, [prompt], SamplingParams(temperature=1.0), 2, eos_id=None, gamma=3,
                     rule="target_only", generator=torch.Generator().manual_seed(0), trace=trace, backend=backend)
    assert len(trace) == 1                                   # one draft → verify step after the first token
    ref = reference_draft_confidences(model, head, prompt, int(r.tokens[0, 0]), 3)
    torch.testing.assert_close(trace[0][0][0], torch.tensor(ref), atol=1e-4, rtol=1e-4)


def test_rule_auto_needs_a_drafting_policy(peaky):
    """The engine does not pick RS or TO per row itself: rule auto at τ > 0 with a bare γ is refused."""
    model, head = peaky
    with pytest.raises(BebopError, match="drafting policy"):
        generate_mtp(model, head, [[1, 2]], SamplingParams(), 4, eos_id=None, gamma=2, rule="auto")


class _Syncs(TorchDispatchMode):
    """Counts host synchronisations (``bool()``/``.item()``/``int()`` on a tensor, ``nonzero``) by phase: inside
    ``spec_step`` (``inside`` > 0) or between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.in_step = self.between = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero,
                                   torch.ops.aten.item, torch.ops.aten.nonzero):
            if self.inside:
                self.in_step += 1
            else:
                self.between += 1
        return func(*args, **(kwargs or {}))


def test_mtp_decode_syncs_the_host_once_per_verify_step(peaky, tiny_tokenizer, monkeypatch):
    """No host synchronisation inside a step (drafts, verify, roll back); one per verify step in the loop (is
    every row done?), plus a fixed few per call (the first check, the token count, the acceptance counters)."""
    import bebop.engine.decode as decode

    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 4)
    counter = _Syncs()
    real = decode.spec_step

    def counted(*args, **kwargs):
        counter.inside += 1
        try:
            return real(*args, **kwargs)
        finally:
            counter.inside -= 1

    monkeypatch.setattr(decode, "spec_step", counted)
    gen = torch.Generator().manual_seed(0)
    generate_mtp(model, head, prompts, SamplingParams(1.0), 16, eos_id=None, gamma=3, generator=gen)  # warm
    counter.in_step = counter.between = 0
    with counter:
        r = generate_mtp(model, head, prompts, SamplingParams(1.0), 16, eos_id=None, gamma=3, generator=gen)
    steps = r.metrics.target_forwards
    assert steps >= 4 and counter.in_step == 0
    assert steps <= counter.between <= steps + 8


def test_decode_metrics_count_the_same_decode_phase_for_plain_and_mtp(peaky, tiny_tokenizer):
    """Both decoders take every row's first token from the prefill and start the decode clock after it:
    ``decode_tokens`` = tokens − rows, and the live rows per batch slot of a static batch are counted."""
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    greedy = generate(model, prompts, SamplingParams(temperature=0.0), 10, eos_id=None)
    eos = int(greedy.tokens[0, 3])                         # row 0 finishes early: not every slot stays live
    for r in (generate(model, prompts, SamplingParams(1.0), 10, eos_id=eos),
              generate_mtp(model, head, prompts, SamplingParams(1.0), 10, eos_id=eos, gamma=3)):
        m = r.metrics
        assert m.decode_tokens == int(r.lengths.sum()) - len(prompts) == m.tokens - len(prompts)
        assert 0 < m.decode_seconds < m.seconds
        assert m.decode_tokens_per_s == pytest.approx(m.decode_tokens / m.decode_seconds)
        assert m.slot_steps == len(prompts) * m.target_forwards
        assert 0 < m.utilization <= 1
    plain, mtp = (generate(model, prompts, SamplingParams(1.0), 10, eos_id=None),
                  generate_mtp(model, head, prompts, SamplingParams(1.0), 10, eos_id=None, gamma=3))
    assert plain.metrics.utilization == 1.0 and plain.metrics.target_forwards == 9
    assert mtp.metrics.live_steps == mtp.metrics.steps
