"""Tests for bebop.models.mtp: the MTP head (DESIGN §2), its masks/caches, unroll, and checkpoint layouts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from bebop.errors import BebopError
from bebop.models.checkpoint import export_head, load_head, save_head
from bebop.models.hf_mtp import hf_mtp_generate
from bebop.models.mtp import MTPHead

H, V, N_BASE = 64, 97, 2
BLOCK = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
]


def tiny_config(hidden: int = H, vocab: int = V) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden,
        num_hidden_layers=N_BASE,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=vocab,
        intermediate_size=128,
    )


def tiny_model(hidden: int = H, vocab: int = V, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_config(hidden, vocab)).eval()


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def head(model) -> MTPHead:
    torch.manual_seed(1)
    h = MTPHead.from_base(model).eval()
    with torch.no_grad():  # move away from the warm start so every weight matters in the round trips
        for p in h.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return h


def base_hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def perturbed_row_setup(model, b=2, t=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    return ids, base_hidden(model, ids)


# ---------------------------------------------------------------------------------------------- parameters
def test_head_params_exclude_shared_and_share_storage(model, head):
    keys = set(head.state_dict())
    assert not any("embed" in k or "lm_head" in k or "shared_head" in k or "rotary" in k for k in keys)
    assert keys == {f"layers.0.{p}" for p in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "post_norm.weight")} | {
        f"layers.0.mtp_block.{b}" for b in BLOCK
    }
    emb = model.get_input_embeddings().weight
    assert head.embed_tokens is model.get_input_embeddings()
    assert head.embed_tokens.weight.data_ptr() == emb.data_ptr()
    assert head.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert all(p.data_ptr() != emb.data_ptr() for p in head.parameters())
    clone = copy.deepcopy(head)
    assert clone.embed_tokens is model.get_input_embeddings()  # still shared after deepcopy
    # warm start: block = base last layer; post_norm = base final norm
    fresh = MTPHead.from_base(model)
    last = model.model.layers[-1].state_dict()
    for k, v in fresh.layers[0].mtp_block.state_dict().items():
        assert torch.equal(v, last[k])
    assert torch.equal(fresh.layers[0].post_norm.weight, model.model.norm.weight)


def test_hidden_states_last_is_post_final_norm(model):
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], model.model(ids).last_hidden_state)
        assert torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits)


# ---------------------------------------------------------------------------------------------- forward / cache
def test_cached_incremental_equals_full(model, head):
    ids, hid = perturbed_row_setup(model)
    b, t = ids.shape
    pos = torch.arange(t)[None].expand(b, t)
    with torch.no_grad():
        full = head(ids, hid, pos)
        cache = head.new_cache()
        inc = torch.cat(
            [head(ids[:, i : i + 1], hid[:, i : i + 1], pos[:, i : i + 1], cache=cache) for i in range(t)], 1
        )
        torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)
        # mixed chunks: prefill 3, then 1, then 3 (T > 1 with a non-empty cache)
        cache = DynamicCache()
        am = torch.ones(b, t, dtype=torch.long)
        parts, s = [], 0
        for n in (3, 1, 3):
            parts.append(head(ids[:, s : s + n], hid[:, s : s + n], pos[:, s : s + n], am[:, : s + n], cache))
            s += n
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_holes_in_mask_equal_compacted_rows(model, head):
    ids, hid = perturbed_row_setup(model, b=3, t=7, seed=5)
    am = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = head(ids, hid, pos, attention_mask=am)
        assert torch.isfinite(full).all()
        cache = head.new_cache()
        inc = torch.cat(
            [head(ids[:, i : i + 1], hid[:, i : i + 1], pos[:, i : i + 1], am[:, : i + 1], cache) for i in range(7)], 1
        )
        assert torch.isfinite(inc).all()
        for r in range(3):
            keep = am[r].bool()
            alone = head(ids[r : r + 1, keep], hid[r : r + 1, keep], pos[r : r + 1, keep])
            torch.testing.assert_close(full[r, keep], alone[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(inc[r, keep], alone[0], atol=1e-5, rtol=0)
        eager = copy.deepcopy(head)  # the additive 4D mask means the same under eager attention
        eager.config._attn_implementation = "eager"
        torch.testing.assert_close(eager(ids, hid, pos, attention_mask=am), full, atol=1e-5, rtol=0)


def test_forward_bad_shapes(model, head):
    ids, hid = perturbed_row_setup(model)
    pos = torch.arange(7)[None].expand(2, 7)
    with pytest.raises(BebopError, match=r"\(2, 7, 64\)"):
        head(ids, hid[..., :32], pos)
    with pytest.raises(BebopError, match=r"\(2, 5\)"):
        head(ids, hid, pos, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(BebopError, match="3"):
        head(ids, hid, pos, layer=3)
    with pytest.raises(BebopError, match="not bound"):
        MTPHead(tiny_config())(ids, hid, pos)


# ---------------------------------------------------------------------------------------------- unroll
def test_unroll_alignment(model, head):
    ids, hid = perturbed_row_setup(model, b=2, t=8, seed=7)
    b, t = ids.shape
    pos = torch.arange(t)[None].expand(b, t)
    with torch.no_grad():
        h1, h2, h3 = head.unroll(ids, hid, steps=3)
        # step 1 at position t consumes x_{t+1} and h^0_t, causal over the step-1 slots
        ref1 = head(ids[:, 1:], hid[:, :-1], pos[:, :-1] + 1)
        torch.testing.assert_close(h1[:, :-1], ref1, atol=1e-5, rtol=0)
        # step k >= 2 at position t drafts as the engine does: its head cache holds the step-1 slots 0..t, then
        # this draft's chain (step 2 consumes x_{t+2} and h^1_t, step 3 x_{t+3} and h^2_t)
        for s in range(t - 3):
            cache = head.new_cache()
            g = head(ids[:, 1 : s + 2], hid[:, : s + 1], pos[:, : s + 1] + 1, cache=cache)[:, -1:]
            torch.testing.assert_close(g[:, 0], h1[:, s], atol=1e-5, rtol=0)
            for k, hk in ((2, h2), (3, h3)):
                g = head(ids[:, s + k : s + k + 1], g, pos[:, s : s + 1] + k,
                         attention_mask=torch.ones(b, s + k, dtype=torch.long), cache=cache)
                torch.testing.assert_close(g[:, 0], hk[:, s], atol=1e-5, rtol=0)
        # with left padding: each row equals the unpadded row alone
        am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
        u1, u2 = head.unroll(ids, hid, steps=2, attention_mask=am)
        a1, a2 = head.unroll(ids[:1, 2:], hid[:1, 2:], steps=2)
        torch.testing.assert_close(u1[0, 2:-1], a1[0, :-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(u2[0, 2:-2], a2[0, :-2], atol=1e-5, rtol=0)
        assert torch.isfinite(u2).all()
    with pytest.raises(BebopError, match="0"):
        head.unroll(ids, hid, steps=0)


# ---------------------------------------------------------------------------------------------- checkpoints
def outputs(h, model):
    ids, hid = perturbed_row_setup(model, seed=11)
    with torch.no_grad():
        return h.logits(h(ids, hid, torch.arange(7)[None].expand(2, 7)))


def test_save_load_roundtrip(tmp_path, model, head):
    save_head(head, tmp_path / "ck", model.config)
    info = json.loads((tmp_path / "ck" / "mtp_config.json").read_text())
    assert info["num_layers"] == 1 and info["vocab_size"] == V and info["hidden_size"] == H
    assert info["model_type"] == "qwen3" and info["num_hidden_layers"] == N_BASE and info["layout_version"] == 1
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["mtp.safetensors", "mtp_config.json"]
    loaded = load_head(tmp_path / "ck", model)
    assert torch.equal(outputs(loaded, model), outputs(head, model))
    loaded2 = load_head(tmp_path / "ck" / "mtp.safetensors", model)
    assert torch.equal(outputs(loaded2, model), outputs(head, model))


QWEN35_KEYS = {
    "mtp.fc.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
    "mtp.norm.weight",
} | {f"mtp.layers.0.{b}" for b in BLOCK}
DEEPSEEK_KEYS = {
    "model.layers.2.enorm.weight",
    "model.layers.2.hnorm.weight",
    "model.layers.2.eh_proj.weight",
    "model.layers.2.shared_head.norm.weight",
    "model.layers.2.embed_tokens.weight",
    "model.layers.2.shared_head.head.weight",
} | {f"model.layers.2.{b}" for b in BLOCK}


@pytest.mark.parametrize("layout,keys", [("qwen3_5", QWEN35_KEYS), ("deepseek_v3", DEEPSEEK_KEYS)])
def test_export_public_layouts(tmp_path, model, head, layout, keys):
    f = tmp_path / f"{layout}.safetensors"
    export_head(head, f, layout)
    sd = load_file(str(f))
    assert set(sd) == keys
    fc = sd["mtp.fc.weight" if layout == "qwen3_5" else "model.layers.2.eh_proj.weight"]
    assert torch.equal(fc, head.layers[0].eh_proj.weight)  # [H, 2H], embedding half first (unchanged)
    loaded = load_head(f, model)
    assert torch.equal(outputs(loaded, model), outputs(head, model))
    # a directory export is loadable too, and files without Bebop metadata (as published) as well
    export_head(head, tmp_path / "dir", layout)
    assert torch.equal(outputs(load_head(tmp_path / "dir", model), model), outputs(head, model))
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    assert torch.equal(outputs(load_head(bare, model), model), outputs(head, model))


def test_deepseek_multi_layer_and_qwen35_single_layer(tmp_path, model):
    h2 = MTPHead.from_base(model, num_layers=2)
    f = tmp_path / "ds2.safetensors"
    export_head(h2, f, "deepseek_v3", num_base_layers=61, include_shared=False)
    keys = set(load_file(str(f)))
    assert "model.layers.62.eh_proj.weight" in keys and "model.layers.61.shared_head.norm.weight" in keys
    loaded = load_head(f, model)
    assert loaded.num_layers == 2
    for a, b in zip(loaded.state_dict().values(), h2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(BebopError, match="2 layers"):
        export_head(h2, tmp_path / "q.safetensors", "qwen3_5")


def test_load_errors(tmp_path, model, head):
    with pytest.raises(BebopError, match="nope"):
        load_head(tmp_path / "nope", model)
    with pytest.raises(BebopError, match="missing.safetensors"):
        load_head(tmp_path / "missing.safetensors", model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07not a safetensors file at all" * 3)
    with pytest.raises(BebopError, match="garbage.safetensors"):
        load_head(garbage, model)
    save_head(head, tmp_path / "ok", model.config)
    data = (tmp_path / "ok" / "mtp.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(BebopError, match="trunc.safetensors"):
        load_head(trunc, model)
    with pytest.raises(BebopError, match="megatron"):
        export_head(head, tmp_path / "x.safetensors", "megatron")


def test_size_mismatch_errors(tmp_path, model, head):
    small = MTPHead(tiny_config(hidden=32))  # head for hidden 32, model has hidden 64
    save_head(small, tmp_path / "h32", tiny_config(hidden=32))
    with pytest.raises(BebopError, match=r"32.*64"):
        load_head(tmp_path / "h32", model)
    bare = tmp_path / "h32_bare.safetensors"  # no metadata: detected from eh_proj's shape
    save_file(load_file(str(tmp_path / "h32" / "mtp.safetensors")), str(bare))
    with pytest.raises(BebopError, match=r"hidden size 32.*64"):
        load_head(bare, model)
    other_vocab = tiny_model(vocab=50)
    save_head(head, tmp_path / "v97", model.config)
    with pytest.raises(BebopError, match=r"97.*50"):
        load_head(tmp_path / "v97", other_vocab)
    ds = tmp_path / "ds.safetensors"
    export_head(head, ds, "deepseek_v3")
    save_file(load_file(str(ds)), str(ds))  # drop metadata: vocab only visible via the shared copies' shapes
    with pytest.raises(BebopError, match=r"vocab 97.*vocab 50"):
        load_head(ds, other_vocab)
    with pytest.raises(BebopError, match=r"97.*50"):
        head.bind(other_vocab)


def test_key_errors(tmp_path, model, head):
    save_head(head, tmp_path / "ck", model.config)
    sd = load_file(str(tmp_path / "ck" / "mtp.safetensors"))
    del sd["layers.0.mtp_block.mlp.up_proj.weight"]
    sd["layers.0.mtp_block.mlp.bogus.weight"] = torch.zeros(3)
    f = tmp_path / "bad.safetensors"
    save_file(sd, str(f))
    with pytest.raises(BebopError, match=r"missing.*up_proj.*unexpected.*bogus"):
        load_head(f, model)
    sd = load_file(str(tmp_path / "ck" / "mtp.safetensors"))
    sd["lm_head.weight"] = torch.zeros(V, H)
    save_file(sd, str(f))
    with pytest.raises(BebopError, match="lm_head.weight"):
        load_head(f, model)


# ---------------------------------------------------------------------------------------------- HF generate
def test_hf_generate_use_mtp(model, head, monkeypatch):
    from transformers.modeling_layers import MtpModel

    built = []
    original = MtpModel.from_pretrained.__func__

    def spy(cls, main_model, **kw):
        built.append(original(cls, main_model, **kw))
        return built[-1]

    monkeypatch.setattr(MtpModel, "from_pretrained", classmethod(spy))
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=8, do_sample=False)
        mtp = hf_mtp_generate(model, head, ids, 8, do_sample=False)
    assert torch.equal(plain, mtp)  # greedy speculative decoding is exact
    (mtp_model,) = built
    theirs = mtp_model.state_dict()
    for k, v in head.state_dict().items():
        assert torch.equal(theirs[k], v), k  # transformers loaded exactly our weights under Bebop's names
    # config and class state restored
    assert getattr(model.config, "num_mtp_layers", None) is None
    assert model.config.name_or_path == "" and not model._keys_to_ignore_on_load_unexpected
    with pytest.raises(BebopError, match="batch size 1"):
        hf_mtp_generate(model, head, torch.zeros(2, 3, dtype=torch.long), 4)


def test_unbound_export_and_paths(tmp_path):
    h = MTPHead(tiny_config())
    export_head(h, tmp_path / "d", "deepseek_v3")  # unbound: no shared copies
    keys = set(load_file(str(tmp_path / "d" / "mtp.safetensors")))
    assert "model.layers.2.embed_tokens.weight" not in keys
    assert json.loads(Path(tmp_path / "d" / "mtp_config.json").read_text())["layout"] == "deepseek_v3"
    with pytest.raises(BebopError, match="not bound"):
        export_head(h, tmp_path / "e.safetensors", "deepseek_v3", include_shared=True)
