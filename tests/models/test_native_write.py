"""Writing a head as the model's own MTP layer: the checkpoint has the family's native keys, index and config key,
reloads with equal logits, keeps its dtype; a checkpoint copied with a new head keeps every other tensor byte for
byte and drops its old MTP layer; layouts that cannot hold the head are refused, leaving nothing behind."""

from __future__ import annotations

import copy
import json
import shutil

import native_helpers
import pytest
import torch
from native_helpers import SHAPE, T, perturbed_head, raw, shard_keys
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bebop.errors import BebopError
from bebop.models.families import NATIVE_MTP_ARCHS, build_family_policy
from bebop.models.mtp import MTPHead
from bebop.models.native import load_native_head, native_keys
from bebop.models.native_write import add_shards, copy_checkpoint_with_head, save_model_with_head
from bebop.models.policy import save_policy

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

saved, tok = native_helpers.saved, native_helpers.tok  # the shared fixtures


def _reload(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    model.eval()
    return model, load_native_head(out, model).eval(), info


@pytest.mark.parametrize("arch", NATIVE_MTP_ARCHS)
def test_written_checkpoint_has_the_native_layout(arch, saved):
    model, head, out = saved(arch)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = shard_keys(out)
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


def test_copy_keeps_other_tensors_and_swaps_the_mtp_layer(tmp_path, saved, tok):
    """The copy holds the source's non-MTP tensors unchanged, none of its old MTP tensors, the new head (split
    into shards of at most max_shard_size) and an index that tells the truth; files besides weights are copied."""
    model, _, written = saved("qwen3_next")
    out = tmp_path / "src"
    shutil.copytree(written, out)
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / "pytorch_model.bin.index.json").write_text("{}")  # another format's index: not carried over
    torch.manual_seed(3)
    new = perturbed_head(model)
    copy_checkpoint_with_head(out, model, new, tmp_path / "copy", max_shard_size="20KB")
    dst = tmp_path / "copy"
    assert (dst / "chat_template.jinja").read_text() == "{{ messages }}" and (dst / "tokenizer.json").is_file()
    assert not (dst / "pytorch_model.bin.index.json").exists()
    src_mtp, dst_mtp = native_keys(out), native_keys(dst)
    assert set(src_mtp) == set(dst_mtp)
    assert len(set(dst_mtp.values())) >= 2  # the head's shards are cut at 20KB
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = shard_keys(dst)
    assert set(index["weight_map"]) == set().union(*shards.values())
    assert all(k in shards[f] for k, f in index["weight_map"].items())
    src_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == src_index["metadata"]["total_size"]  # same head shapes
    for key, shard in src_index["weight_map"].items():
        with (
            safe_open(str(out / shard), framework="pt") as a,
            safe_open(str(dst / index["weight_map"][key]), framework="pt") as b,
        ):
            same = torch.equal(a.get_tensor(key), b.get_tensor(key))
        assert same == (key not in src_mtp)  # the head replaced every MTP tensor
    head = load_native_head(dst, model)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), new.state_dict().values(), strict=True))


def test_copy_of_a_single_file_checkpoint(tmp_path, saved, tok):
    """A checkpoint in one model.safetensors with its MTP tensors inside: the copy rewrites that file without them
    and indexes it with the head's shard."""
    model, head, out = saved("qwen3_5")
    single = tmp_path / "single"
    save_model_with_head(model, tok, None, single, max_shard_size="1GB")
    with_mtp = raw(single, "") | {k: v for k, v in raw(out, "").items() if k.startswith("mtp.")}
    save_file(with_mtp, str(single / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(4)
    new = perturbed_head(model)
    copy_checkpoint_with_head(single, model, new, tmp_path / "copy")
    assert sorted(shard_keys(tmp_path / "copy")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert set(native_keys(tmp_path / "copy").values()) == {"model-00002-of-00002.safetensors"}
    assert set(raw(tmp_path / "copy", "")) == set(with_mtp)
    got = load_native_head(tmp_path / "copy", model).state_dict()
    assert all(torch.equal(got[k], v) for k, v in new.state_dict().items())


def test_qwen35_layout_holds_one_layer_and_existing_output_survives(tmp_path, saved, tok):
    model, _, out = saved("qwen3_5")
    two = MTPHead.from_base(model, num_layers=2)
    target = tmp_path / "out"
    save_model_with_head(model, tok, None, target)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(BebopError, match="exactly one MTP layer .* 2 layers"):
        save_model_with_head(model, tok, two, target)
    assert sorted(p.name for p in target.iterdir()) == before
    with pytest.raises(BebopError, match="already use the MTP names mtp.fc.weight"):
        add_shards(out, {"mtp.fc.weight": torch.zeros(1)})


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


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_families_without_native_layout_are_refused(arch, tmp_path, tok):
    model = build_family_policy(arch, SHAPE, tok)
    with pytest.raises(BebopError, match=rf"model type '{arch}' has no native MTP layout"):
        save_model_with_head(model, tok, MTPHead.from_base(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_policy(model, tok, tmp_path / "m")
    with pytest.raises(BebopError, match=rf"model type '{arch}' has no native MTP layout"):
        copy_checkpoint_with_head(tmp_path / "m", model, MTPHead.from_base(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()
