"""`bebop export`: the head merged into a copy of the checkpoint as its native MTP layer reloads with equal model
and head logits in every native family; the printed flags select probabilistic drafts and rejection sampling;
bad input gets one clear error and leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head, save_head
from bebop.models.export import checkpoint_dtype, export_model
from bebop.models.families import NATIVE_MTP_ARCHS, build_family_policy
from bebop.models.mtp import MTPHead
from bebop.models.native import native_keys, save_model_with_head
from bebop.models.policy import ModelConfig, load_policy, save_policy
from bebop.models.serving import serve_commands
from bebop.models.tokenizer import build_tokenizer

SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["the cat sat on the mat , 1 + 2 = 3 ."])


def _checkpoint(arch, tok, root):
    """A model directory of ``arch`` with its native MTP layer, and a fine-tuned head (Bebop layout) for it."""
    torch.manual_seed(0)
    model = build_family_policy(arch, SHAPE, tok).eval()
    save_model_with_head(model, tok, MTPHead.from_base(model).eval(), root / "model")
    model, _ = load_policy(root / "model", "cpu", "float32")
    tuned = load_head("native", model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_head(tuned, root / "head", model.config)
    return model, tuned


def _head_logits(model, head, ids):
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    return [head.logits(h) for h in head.unroll(ids, hidden, 2)]


@pytest.mark.parametrize("arch", NATIVE_MTP_ARCHS)
def test_export_reload_gives_equal_logits(arch, tok, tmp_path):
    model, tuned = _checkpoint(arch, tok, tmp_path)
    done = export_model(tmp_path / "model", tmp_path / "head", tmp_path / "out", max_shard_size="100KB")
    assert done.num_layers == 1 and done.dtype == "float32"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 2
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert native_keys(tmp_path / "out")
    again, _ = load_policy(tmp_path / "out", "cpu", "float32")
    head = load_head("native", again)
    ids = torch.tensor([[1, 5, 7, 9, 4, 6, 8, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
        for a, b in zip(_head_logits(again, head, ids), _head_logits(model, tuned, ids), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        # the merged head is the fine-tuned one, not the checkpoint's original native layer
        original = load_head("native", load_policy(tmp_path / "model", "cpu", "float32")[0])
        assert not torch.allclose(_head_logits(model, original, ids)[0], _head_logits(again, head, ids)[0])


def test_export_keeps_the_checkpoint_dtype(tok, tmp_path):
    torch.manual_seed(0)
    model = build_family_policy("deepseek_v3", SHAPE, tok).to(torch.bfloat16).eval()
    save_model_with_head(model, tok, MTPHead.from_base(model).eval(), tmp_path / "model")
    assert checkpoint_dtype(json.loads((tmp_path / "model" / "config.json").read_text())) == torch.bfloat16
    done = export_model(tmp_path / "model", "native", tmp_path / "out")
    assert done.dtype == "bfloat16"
    again, _ = load_policy(tmp_path / "out", "cpu", "bfloat16")
    assert load_head("native", again).layers[0].eh_proj.weight.dtype == torch.bfloat16


def test_serve_commands_select_probabilistic_drafts_and_rejection_sampling():
    cmds = serve_commands("/m dir", 4)
    assert "vllm serve '/m dir' --speculative-config" in cmds.vllm
    spec = json.loads(cmds.vllm.split("--speculative-config ")[1].strip("'"))
    assert spec == {"method": "mtp", "num_speculative_tokens": 4, "draft_sample_method": "probabilistic"}
    for flag in ("--speculative-algorithm NEXTN", "--speculative-num-steps 4", "--speculative-eagle-topk 1",
                 "--speculative-num-draft-tokens 5", "--speculative-use-rejection-sampling"):
        assert flag in cmds.sglang
    with pytest.raises(BebopError, match="gamma must be >= 1"):
        serve_commands("/m", 0)


def test_export_bad_input(tok, tmp_path):
    _checkpoint("qwen3_5", tok, tmp_path)
    # a family without a native MTP layout
    torch.manual_seed(0)
    save_policy(build_family_policy("qwen3", SHAPE, tok), tok, tmp_path / "dense")
    with pytest.raises(BebopError, match="model type 'qwen3' has no native MTP layout"):
        export_model(tmp_path / "dense", "native", tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    # an output directory that holds something, or the model directory itself
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("data")
    with pytest.raises(BebopError, match="already exists and is not empty"):
        export_model(tmp_path / "model", "native", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "data"
    with pytest.raises(BebopError, match="is the model directory itself"):
        export_model(tmp_path / "model", "native", tmp_path / "model")
    # a head made for another hidden size
    torch.manual_seed(0)
    wide = build_family_policy("qwen3_5", ModelConfig(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1,
                                                      intermediate_size=64), tok)
    save_head(MTPHead.from_base(wide), tmp_path / "wide_head", wide.config)
    with pytest.raises(BebopError, match="hidden size 64"):
        export_model(tmp_path / "model", tmp_path / "wide_head", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    # a checkpoint without a tokenizer
    (tmp_path / "model" / "tokenizer.json").unlink()
    with pytest.raises(BebopError, match="has no tokenizer.json"):
        export_model(tmp_path / "model", "native", tmp_path / "o3")
    assert not (tmp_path / "o3").exists()
