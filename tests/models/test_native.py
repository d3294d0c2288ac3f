"""Native MTP weights in model directories: written as the released checkpoints store them (sharded safetensors,
index, the families' real key names and config keys), imported with logits equal to each family's own MTP
computation (transformers' MtpModel for DeepSeek-V3 / GLM, the family's modules assembled by hand for Qwen3.5 /
Qwen3-Next / MiMo), reloaded unchanged, and refused with one clear error on bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bebop.errors import BebopError
from bebop.models.families import ARCHS, NATIVE_MTP_ARCHS, build_family_policy, family_config
from bebop.models.mtp import MTPHead
from bebop.models.native import (
    _save,
    load_native_head,
    native_keys,
    native_layout,
    num_native_layers,
    save_model_with_head,
)
from bebop.models.policy import ModelConfig, save_policy
from bebop.models.tokenizer import build_tokenizer

SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
T = 8  # MTP slots compared (a multi-token causal sequence)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["the cat sat on the mat , 1 + 2 = 3 ."])


def _perturbed_head(model) -> MTPHead:
    """A warm-started head moved off its warm start, so every tensor matters in the comparisons."""
    head = MTPHead.from_base(model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """arch -> (model, head, directory written by save_model_with_head), built once per family."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            model = build_family_policy(arch, SHAPE, tok).eval()
            head = _perturbed_head(model)
            out = tmp_path_factory.mktemp(arch) / "model"
            save_model_with_head(model, tok, head, out)
            cache[arch] = (model, head, out)
        return cache[arch]

    return get


def _shard_keys(out: Path) -> dict[str, set[str]]:
    keys = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            keys[f.name] = set(s.keys())
    return keys


def _raw(out: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under ``prefix`` read straight from the shards, prefix stripped (the reference's view)."""
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            found.update({k[len(prefix) :]: s.get_tensor(k) for k in s.keys() if k.startswith(prefix)})
    return found


def _causal(t: int) -> torch.Tensor:
    return torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]


def _reload(out: Path):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    model.eval()
    return model, load_native_head(out, model).eval(), info


# ----------------------------------------------------------------------------------------------- config side
def test_layout_and_count_of_configs():
    for arch in ARCHS:
        cfg = family_config(arch, 40, SHAPE)
        want = {"qwen3_5": "qwen3_5", "qwen3_next": "qwen3_5", "deepseek_v3": "deepseek_v3", "glm4_moe": "deepseek_v3"}
        assert native_layout(cfg) == want.get(arch)
        assert num_native_layers(cfg) == (1 if arch in NATIVE_MTP_ARCHS else 0)
    vl = {"model_type": "qwen3_5", "text_config": {"model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1}}
    kimi = {"model_type": "kimi_k25", "text_config": {"model_type": "deepseek_v3", "num_nextn_predict_layers": 2}}
    mimo = {"model_type": "mimo", "num_nextn_predict_layers": 1}
    moe = {"model_type": "qwen3_5_moe_text", "mtp_num_hidden_layers": 1}
    assert [native_layout(c) for c in (vl, kimi, mimo, moe)] == ["qwen3_5", "deepseek_v3", "mimo", "qwen3_5"]
    assert [num_native_layers(c) for c in (vl, kimi, mimo, moe)] == [1, 2, 1, 1]
    assert native_layout({"model_type": "qwen2"}) is None and num_native_layers({"model_type": "llama"}) == 0


# ----------------------------------------------------------------------------------------------- written layout
EXPECTED_KEYS = {
    "qwen3_5": {
        "mtp.fc.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.pre_fc_norm_hidden.weight",
        "mtp.norm.weight",
        "mtp.layers.0.self_attn.q_proj.weight",
        "mtp.layers.0.self_attn.q_norm.weight",
        "mtp.layers.0.input_layernorm.weight",
        "mtp.layers.0.mlp.gate_proj.weight",
    },
    "qwen3_next": {
        "mtp.fc.weight",
        "mtp.pre_fc_norm_embedding.weight",
        "mtp.norm.weight",
        "mtp.layers.0.self_attn.q_proj.weight",
        "mtp.layers.0.mlp.experts.3.gate_proj.weight",
        "mtp.layers.0.mlp.experts.0.down_proj.weight",
        "mtp.layers.0.mlp.shared_expert.up_proj.weight",
        "mtp.layers.0.mlp.shared_expert_gate.weight",
        "mtp.layers.0.mlp.gate.weight",
    },
    "deepseek_v3": {
        "model.layers.2.eh_proj.weight",
        "model.layers.2.enorm.weight",
        "model.layers.2.hnorm.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.2.shared_head.head.weight",
        "model.layers.2.embed_tokens.weight",
        "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.2.mlp.experts.3.up_proj.weight",
        "model.layers.2.mlp.shared_experts.down_proj.weight",
        "model.layers.2.mlp.gate.e_score_correction_bias",
    },
    "glm4_moe": {
        "model.layers.2.eh_proj.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.2.shared_head.head.weight",
        "model.layers.2.embed_tokens.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.mlp.experts.0.gate_proj.weight",
    },
}


@pytest.mark.parametrize("arch", NATIVE_MTP_ARCHS)
def test_written_checkpoint_has_the_native_layout(arch, saved):
    model, head, out = saved(arch)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = _shard_keys(out)
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert all(k in shards[f] for k, f in index["weight_map"].items())  # the index tells the truth
    assert set(index["weight_map"]) == set().union(*shards.values())
    sizes = {}
    for f in shards:
        with safe_open(str(out / f), framework="pt") as s:
            sizes.update({k: s.get_slice(k).get_shape() for k in s.keys()})
    assert index["metadata"]["total_size"] == 4 * sum(torch.Size(s).numel() for s in sizes.values())
    mtp = native_keys(out)
    assert EXPECTED_KEYS[arch] <= set(mtp)
    assert not any("mtp_block" in k or "experts.gate_up_proj" in k for k in mtp)  # checkpoint format, not memory
    assert all(mtp[k] == index["weight_map"][k] for k in mtp)
    assert not any(k in mtp for k in model.state_dict())  # nothing of the base model is taken for MTP
    config = json.loads((out / "config.json").read_text())
    key = "mtp_num_hidden_layers" if arch in ("qwen3_5", "qwen3_next") else "num_nextn_predict_layers"
    assert config[key] == 1
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", NATIVE_MTP_ARCHS)
def test_write_reload_gives_equal_logits(arch, saved, tok):
    model, head, out = saved(arch)
    model2, head2, info = _reload(out)
    assert not info["missing_keys"]
    if arch in ("qwen3_5", "qwen3_next"):  # transformers ignores ^mtp.* itself: a clean load
        assert not info["unexpected_keys"]
    else:  # its ignore list names only the released depths (model.layers.61 / 46 / 92): the tiny N=2 is reported
        assert info["unexpected_keys"] and all(k.startswith("model.layers.2.") for k in info["unexpected_keys"])
    ids = torch.randint(0, len(tok), (2, T + 2))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits, atol=1e-5)
        for h1, h2 in zip(
            head.unroll(ids, model.model(ids).last_hidden_state, 2),
            head2.unroll(ids, model2.model(ids).last_hidden_state, 2),
            strict=True,
        ):
            assert torch.allclose(head.logits(h1), head2.logits(h2), atol=1e-5)
    sd, sd2 = head.state_dict(), head2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


# ----------------------------------------------------------------------------------------------- references
def _inputs(model, tok, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok), (1, T + 1), generator=g)
    with torch.no_grad():
        h0 = model.model(ids).last_hidden_state[:, :T]
    return ids[:, 1:], h0, torch.arange(1, T + 1)[None]


def _bebop_logits(model, out, tok):
    head = load_native_head(out, model).eval()
    x, h0, pos = _inputs(model, tok)
    with torch.no_grad():
        return head.logits(head(x, h0, pos))


def _fuse_experts(block: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> the fused in-memory ones, written out by hand for the reference."""
    out = {k: v for k, v in block.items() if ".experts." not in k}
    gate_up = [
        torch.cat([block[f"mlp.experts.{j}.gate_proj.weight"], block[f"mlp.experts.{j}.up_proj.weight"]])
        for j in range(n)
    ]
    out["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
    out["mlp.experts.down_proj"] = torch.stack([block[f"mlp.experts.{j}.down_proj.weight"] for j in range(n)])
    return out


def _qwen_reference(
    model, out, tok, hidden_first=False, names=("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")
):
    """The family's own modules assembled by hand: fc(cat[norm_e(emb), norm_h(h)]) -> the family's full-attention
    decoder layer (causal) -> final norm -> shared LM head. MiMo: cat[norm_h(h), norm_e(emb)]."""
    e_name, h_name, fc_name, norm_name = names
    prefix = "mtp." if not hidden_first else "model.mtp_layers.0."
    raw = _raw(out, prefix)
    block_prefix = "layers.0." if not hidden_first else ""
    parts = {f"{n}.weight" for n in names}
    block = {k[len(block_prefix) :]: v for k, v in raw.items() if k.startswith(block_prefix) and k not in parts}
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"]
    if getattr(cfg, "num_experts", 0):
        block = _fuse_experts(block, cfg.num_experts)
    layer = type(model.model.layers[-1])(cfg, 0).eval()
    layer.load_state_dict(block, strict=True)
    norm_cls, eps = type(model.model.norm), model.config.rms_norm_eps
    norms = {}
    for n in (e_name, h_name, norm_name):
        norms[n] = norm_cls(cfg.hidden_size, eps=eps)
        norms[n].load_state_dict({"weight": raw[f"{n}.weight"]})
    fc = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
    fc.load_state_dict({"weight": raw[f"{fc_name}.weight"]})
    x, h0, pos = _inputs(model, tok)
    with torch.no_grad():
        e, h = norms[e_name](model.model.embed_tokens(x)), norms[h_name](h0)
        hidden = fc(torch.cat([h, e] if hidden_first else [e, h], dim=-1))
        hidden = layer(
            hidden, position_embeddings=model.model.rotary_emb(hidden, pos), attention_mask=_causal(T), position_ids=pos
        )
        return model.lm_head(norms[norm_name](hidden))


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_native_import_equals_family_modules_by_hand(arch, saved, tok):
    _, _, out = saved(arch)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = _qwen_reference(model, out, tok)
    assert torch.allclose(_bebop_logits(model, out, tok), ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_native_import_equals_transformers_mtp_model(arch, saved, tok):
    """transformers loads the MTP layer itself (MtpModel.from_pretrained: its key regex, renamings and expert
    fusion). Its regex comes from the class's ignore list (model.layers.61 / 46 / 92), so point it at layer 2."""
    from transformers.modeling_layers import MtpModel

    _, _, out = saved(arch)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    model._keys_to_ignore_on_load_unexpected = {r"model\.layers\.2\..*"}
    ref = MtpModel.from_pretrained(model).eval()
    x, h0, pos = _inputs(model, tok)
    with torch.no_grad():
        want = ref._project_to_logits(ref.forward_layer(0, h0, pos, None, input_ids=x))
    assert torch.allclose(_bebop_logits(model, out, tok), want, atol=1e-5)


def test_mimo_layout_import_equals_mimo_computation(tmp_path, tok):
    """MiMo = Qwen2 + model.mtp_layers.{i} (token_layernorm, hidden_layernorm, input_proj on [hidden, embedding],
    block, final_layernorm). Written and read through the mimo layout of a Qwen2 model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    _save(model, tok, _perturbed_head(model), tmp_path / "mimo", "mimo", "200KB")
    keys = native_keys(tmp_path / "mimo")
    assert {
        "model.mtp_layers.0.token_layernorm.weight",
        "model.mtp_layers.0.hidden_layernorm.weight",
        "model.mtp_layers.0.input_proj.weight",
        "model.mtp_layers.0.final_layernorm.weight",
        "model.mtp_layers.0.self_attn.q_proj.bias",
        "model.mtp_layers.0.input_layernorm.weight",
    } <= set(keys)
    ref = _qwen_reference(
        model,
        tmp_path / "mimo",
        tok,
        hidden_first=True,
        names=("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm"),
    )
    assert torch.allclose(_bebop_logits(model, tmp_path / "mimo", tok), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------- reading
def test_native_keys_touch_only_the_mtp_shards(saved, tok):
    """A damaged shard that holds no MTP tensor does not stop the import: only MTP shards are opened."""
    import shutil

    _, head, out = saved("qwen3_5")
    copy_dir = out.parent / "damaged"
    shutil.copytree(out, copy_dir)
    mtp_shards = set(native_keys(copy_dir).values())
    other = sorted({f.name for f in copy_dir.glob("*.safetensors")} - mtp_shards)
    assert other
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for name in other:
        (copy_dir / name).write_bytes(b"\0" * 16)
    head2 = load_native_head(copy_dir, model)
    assert torch.equal(head2.layers[0].eh_proj.weight, head.layers[0].eh_proj.weight)


def test_single_file_checkpoint(tmp_path, saved, tok):
    """A model saved in one model.safetensors (no index): MTP keys are found in its header, and writing a head
    turns it into an indexed checkpoint of 2 shards."""
    model, head, _ = saved("qwen3_5")
    save_model_with_head(model, tok, head, tmp_path / "one", max_shard_size="1GB")
    assert len(list((tmp_path / "one").glob("*.safetensors"))) == 2
    single = tmp_path / "single"
    save_model_with_head(model, tok, None, single, max_shard_size="1GB")
    assert [f.name for f in single.glob("*.safetensors")] == ["model.safetensors"]
    assert json.loads((single / "config.json").read_text())["mtp_num_hidden_layers"] == 0
    assert native_keys(single) == {}
    tensors = _raw(single, "") | {f"mtp.{k}": v for k, v in _raw(tmp_path / "one", "mtp.").items()}
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    assert set(native_keys(single).values()) == {"model.safetensors"}
    head2 = load_native_head(single, model)
    assert torch.equal(head2.layers[0].post_norm.weight, head.layers[0].post_norm.weight)


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_families_without_native_mtp(arch, tmp_path, tok):
    model = build_family_policy(arch, SHAPE, tok)
    save_policy(model, tok, tmp_path / "m")
    assert native_keys(tmp_path / "m") == {}
    with pytest.raises(
        BebopError, match=rf"{tmp_path / 'm'} has no native MTP weights \(model type '{arch}'\).*fresh head"
    ):
        load_native_head(tmp_path / "m", model)
    with pytest.raises(BebopError, match=rf"model type '{arch}' has no native MTP layout"):
        save_model_with_head(model, tok, MTPHead.from_base(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _with_extra_shard(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    import shutil

    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "extra.safetensors"))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_mtp_keys_in_no_known_layout(tmp_path, saved, tok):
    # DeepSeek-V4-style names on a Qwen3 checkpoint: no known layout at all
    plain = tmp_path / "plain"
    qwen3 = build_family_policy("qwen3", SHAPE, tok)
    qwen3.save_pretrained(plain, max_shard_size="50KB")
    v4 = {"mtp.0.enorm.weight": torch.ones(32), "mtp.0.e_proj.weight": torch.ones(32, 32)}
    with pytest.raises(BebopError, match=r"no known layout; first keys: mtp\.0\.e_proj\.weight, mtp\.0\.enorm\.weight"):
        load_native_head(_with_extra_shard(plain, tmp_path / "v4", v4), qwen3)
    # a Qwen3.5 head with dedicated MTP embeddings: a key outside the layout
    q_model, _, q_out = saved("qwen3_5")
    extra = _with_extra_shard(q_out, tmp_path / "q", {"mtp.embed_tokens.weight": torch.ones(len(tok), 32)})
    with pytest.raises(BebopError, match=r"outside the qwen3_5 layout; first keys: mtp\.embed_tokens\.weight"):
        load_native_head(extra, q_model)
    stacked = _with_extra_shard(q_out, tmp_path / "s", {"mtp.layers.1.input_layernorm.weight": torch.ones(32)})
    with pytest.raises(BebopError, match=r"stacks several decoder layers .*mtp\.layers\.1\.input_layernorm\.weight"):
        load_native_head(stacked, q_model)


@pytest.mark.parametrize("arch", ["qwen3_5", "deepseek_v3"])
def test_head_that_does_not_fit(arch, tmp_path, saved, tok):
    _, head, out = saved(arch)
    wider = build_family_policy(arch, ModelConfig(num_layers=2, hidden_size=48, num_heads=2, num_kv_heads=1), tok)
    with pytest.raises(BebopError, match="hidden_size 32, but the model has hidden_size 48"):
        load_native_head(out, wider)
    big_tok = build_tokenizer(["the cat sat on the mat , 1 + 2 = 3 . and many more words here"])
    bigger = build_family_policy(arch, SHAPE, big_tok)
    with pytest.raises(BebopError, match=rf"vocab_size {len(tok)}, but the model has vocab_size {len(big_tok)}"):
        load_native_head(out, bigger)
    with pytest.raises(BebopError, match=r"hidden size 32 and vocab size .* but the model has hidden size 48"):
        save_model_with_head(wider, tok, head, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_checks_inside_the_checkpoint(tmp_path, saved, tok):
    """The directory's config says hidden 32, but an MTP tensor was made for another width."""
    import shutil

    model, _, out = saved("qwen3_5")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / native_keys(bad)["mtp.fc.weight"]
    with safe_open(str(shard), framework="pt") as s:
        tensors = {k: s.get_tensor(k) for k in s.keys()}
    tensors["mtp.fc.weight"] = torch.zeros(48, 96)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(BebopError, match=r"layers\.0\.eh_proj\.weight has shape \(48, 96\), i\.e\. hidden size 48"):
        load_native_head(bad, model)


def test_qwen35_layout_holds_one_layer_and_existing_output_survives(tmp_path, saved, tok):
    model, _, out = saved("qwen3_5")
    two = MTPHead.from_base(model, num_layers=2)
    target = tmp_path / "out"
    save_model_with_head(model, tok, None, target)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(BebopError, match="exactly one MTP layer .* 2 layers"):
        save_model_with_head(model, tok, two, target)
    assert sorted(p.name for p in target.iterdir()) == before


def test_bf16_model_keeps_its_dtype(tmp_path, saved, tok):
    """A bf16 model gets its head written in bf16 (the shards' dtype) and read back exactly."""
    model, head, _ = saved("qwen3_next")
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    save_model_with_head(model16, tok, head, tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / native_keys(tmp_path / "bf16")["mtp.fc.weight"]), framework="pt") as s:
        assert s.get_tensor("mtp.fc.weight").dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    head2 = load_native_head(tmp_path / "bf16", loaded)
    want = {k: v.to(torch.bfloat16) for k, v in head.state_dict().items()}
    got = head2.state_dict()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
