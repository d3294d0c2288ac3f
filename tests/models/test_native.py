"""Native MTP weights imported as a Bebop head give logits equal (fp32, 1e-5) to each family's own MTP computation:
transformers' MtpModel for DeepSeek-V3 / GLM, the family's modules assembled by hand for Qwen3.5 / Qwen3-Next /
MiMo, and a released-style multimodal Qwen3.5 checkpoint (``qwen3_5`` with a ``text_config``, the language model
under ``model.language_model.``, a vision tower, ``mtp.*`` written by hand) through load, import and export.
Bad input gets one clear error."""

from __future__ import annotations

import copy
import json
import shutil

import native_helpers
import pytest
import torch
from native_helpers import SHAPE, T, perturbed_head, raw, with_extra_shard
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head, save_head
from bebop.models.export import export_model
from bebop.models.families import build_family_policy, family_config
from bebop.models.native import load_native_head, native_keys
from bebop.models.native_write import save_with_layout
from bebop.models.policy import ModelConfig, load_policy, save_policy
from bebop.models.tokenizer import build_tokenizer

saved, tok = native_helpers.saved, native_helpers.tok  # the shared fixtures


def _causal(t: int) -> torch.Tensor:
    return torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]


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
    found = raw(out, prefix)
    block_prefix = "layers.0." if not hidden_first else ""
    parts = {f"{n}.weight" for n in names}
    block = {k[len(block_prefix) :]: v for k, v in found.items() if k.startswith(block_prefix) and k not in parts}
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"]
    if any(".experts.0." in k for k in block):  # per expert on disk; fused ones load as they are
        block = _fuse_experts(block, cfg.num_experts)
    layer = type(model.model.layers[-1])(cfg, 0).eval()
    layer.load_state_dict(block, strict=True)
    norm_cls, eps = type(model.model.norm), model.config.rms_norm_eps
    norms = {}
    for n in (e_name, h_name, norm_name):
        norms[n] = norm_cls(cfg.hidden_size, eps=eps)
        norms[n].load_state_dict({"weight": found[f"{n}.weight"]})
    fc = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
    fc.load_state_dict({"weight": found[f"{fc_name}.weight"]})
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
    save_with_layout(model, tok, perturbed_head(model), tmp_path / "mimo", "mimo", "200KB")
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


# ----------------------------------------------------------------------------------------------- released Qwen3.5
def _released_qwen35(tok, out, moe: bool):
    """A tiny checkpoint written as Qwen/Qwen3.5-* and Qwen3.5-*-A*B are: a multimodal ``qwen3_5`` /
    ``qwen3_5_moe`` config whose ``text_config`` carries ``mtp_num_hidden_layers``; bfloat16 shards with the
    language model under ``model.language_model.``, a vision tower under ``model.visual.``, an untied ``lm_head``,
    ``A_log`` kept in float32, and the ``mtp.*`` tensors of one MTP layer in their own shard, written here by hand
    (15 for the dense model; 19 for MoE, whose experts are stored fused, ``experts.gate_up_proj`` [E, 2I, H])."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
    )
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer

    if moe:
        nx = family_config("qwen3_next", len(tok), SHAPE).to_dict()
        text = {k: v for k, v in nx.items() if k.startswith(("linear_", "num_", "moe_", "shared_expert_"))}
        text |= {k: nx[k] for k in ("vocab_size", "hidden_size", "head_dim", "layer_types", "max_position_embeddings")}
        config_cls, model_cls, layer_cls = Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeDecoderLayer
    else:
        text = family_config("qwen3_5", len(tok), SHAPE).to_dict()
        config_cls, model_cls, layer_cls = Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5DecoderLayer
    text |= {"tie_word_embeddings": False}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4)
    cfg = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False)
    torch.manual_seed(0)
    vl = model_cls(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # zero-centred norms start at 0: move every tensor so that each one matters
        for p in vl.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vl.save_pretrained(out, max_shard_size="50KB")
    tok.save_pretrained(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    a_logs = {}
    for key, shard in index["weight_map"].items():  # A_log in float32, as the released shards store it
        if key.endswith("A_log"):
            with safe_open(str(out / shard), framework="pt") as s:
                tensors, meta = {k: s.get_tensor(k) for k in s.keys()}, s.metadata()
            tensors[key] = a_logs[key] = tensors[key].float() + 1e-3  # a value bfloat16 cannot hold
            save_file(tensors, str(out / shard), metadata=meta)
    vl = vl.float()  # the reference: the checkpoint's values in float32
    vl.load_state_dict(a_logs, strict=False)
    full = copy.deepcopy(vl.config.text_config)
    full.layer_types, full.num_hidden_layers = ["full_attention"], 1
    shapes = {f"mtp.layers.0.{k}": v.shape for k, v in layer_cls(full, 0).state_dict().items()}  # names, shapes
    h = text["hidden_size"]
    shapes |= {"mtp.fc.weight": (h, 2 * h)} | {f"mtp.{n}.weight": (h,) for n in ("pre_fc_norm_embedding", "norm")}
    shapes["mtp.pre_fc_norm_hidden.weight"] = (h,)
    mtp = {k: (torch.randn(shape) * 0.1).to(torch.bfloat16) for k, shape in shapes.items()}
    save_file(mtp, str(out / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    return vl, sorted(mtp)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3_5", "qwen3_5_moe"])
def test_released_multimodal_qwen35_loads_imports_and_exports(moe, tmp_path, tok):
    src = tmp_path / "qwen35"
    vl, mtp_keys = _released_qwen35(tok, src, moe)
    kind = "qwen3_5_moe" if moe else "qwen3_5"
    assert len(mtp_keys) == (19 if moe else 15) and json.loads((src / "config.json").read_text())["model_type"] == kind
    model, _ = load_policy(src, "cpu", "float32")
    assert type(model).__name__ == ("Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM")
    ids = torch.randint(0, len(tok), (1, T + 1))
    with torch.no_grad():  # the causal LM is the wrapper's language model and LM head
        want = vl(input_ids=ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
    assert sorted(native_keys(src)) == mtp_keys
    assert torch.allclose(_bebop_logits(model, src, tok), _qwen_reference(model, src, tok), atol=1e-5)

    torch.manual_seed(1)
    tuned = perturbed_head(model)
    save_head(tuned, tmp_path / "head", model.config)
    done = export_model(src, tmp_path / "head", tmp_path / "out", max_shard_size="20KB")
    assert (done.layout, done.dtype) == ("qwen3_5", "bfloat16")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and config["architectures"] == [type(vl).__name__]
    assert config["text_config"]["mtp_num_hidden_layers"] == 1 and "vision_config" in config
    assert "mtp_num_hidden_layers" not in config
    old, new = raw(src, ""), raw(out, "")
    new_mtp = set(native_keys(out))
    # the vision tower, model.language_model.* and lm_head.weight unchanged, in their dtypes (A_log in float32)
    assert set(new) - new_mtp == set(old) - set(mtp_keys) and new_mtp
    assert all(torch.equal(new[k], old[k]) and new[k].dtype == old[k].dtype for k in old if k not in mtp_keys)
    assert any(k.endswith("A_log") and new[k].dtype == torch.float32 for k in new)
    again, _ = load_policy(out, "cpu", "float32")
    head = load_head("native", again)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
        x, h0, pos = _inputs(model, tok)
        got = head.logits(head(x, h0, pos))
        rounded = tuned.to(torch.bfloat16).float()  # the head as the bfloat16 checkpoint holds it
        torch.testing.assert_close(got, rounded.logits(rounded(x, h0, pos)), atol=1e-5, rtol=0)


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


def test_mtp_keys_in_no_known_layout(tmp_path, saved, tok):
    # DeepSeek-V4-style names on a Qwen3 checkpoint: no known layout at all
    plain = tmp_path / "plain"
    qwen3 = build_family_policy("qwen3", SHAPE, tok)
    qwen3.save_pretrained(plain, max_shard_size="50KB")
    v4 = {"mtp.0.enorm.weight": torch.ones(32), "mtp.0.e_proj.weight": torch.ones(32, 32)}
    with pytest.raises(BebopError, match=r"no known layout; first keys: mtp\.0\.e_proj\.weight, mtp\.0\.enorm\.weight"):
        load_native_head(with_extra_shard(plain, tmp_path / "v4", v4), qwen3)
    # a Qwen3.5 head with dedicated MTP embeddings: a key outside the layout
    q_model, _, q_out = saved("qwen3_5")
    extra = with_extra_shard(q_out, tmp_path / "q", {"mtp.embed_tokens.weight": torch.ones(len(tok), 32)})
    with pytest.raises(BebopError, match=r"outside the qwen3_5 layout; first keys: mtp\.embed_tokens\.weight"):
        load_native_head(extra, q_model)
    stacked = with_extra_shard(q_out, tmp_path / "s", {"mtp.layers.1.input_layernorm.weight": torch.ones(32)})
    with pytest.raises(BebopError, match=r"sharing one fc/norm set .*mtp\.layers\.1\.input_layernorm\.weight"):
        load_native_head(stacked, q_model)


@pytest.mark.parametrize("arch", ["qwen3_5", "deepseek_v3"])
def test_head_that_does_not_fit(arch, tmp_path, saved, tok):
    from bebop.models.native import save_model_with_head

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
