"""Reading a checkpoint's shards through its index: the MTP tensors are found from the index (or a single file's
header) alone and read from only the shards that hold them; num_hidden_layers is found in a wrapper's
text_config; bad files get one clear error."""

from __future__ import annotations

import json
import shutil

import native_helpers
import pytest
import torch
from native_helpers import raw
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bebop.errors import BebopError
from bebop.models.native import load_native_head, save_model_with_head
from bebop.models.native_shards import base_layers, load_tensors, native_keys, weight_map

saved, tok = native_helpers.saved, native_helpers.tok  # the shared fixtures


def test_native_keys_touch_only_the_mtp_shards(saved, tok):
    """A damaged shard that holds no MTP tensor does not stop the import: only MTP shards are opened."""
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
    with pytest.raises(BebopError, match=r"cannot read MTP tensors from shard .*damaged"):
        load_tensors(copy_dir, {"model.norm.weight": other[0]})


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
    tensors = raw(single, "") | {f"mtp.{k}": v for k, v in raw(tmp_path / "one", "mtp.").items()}
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    assert set(native_keys(single).values()) == {"model.safetensors"}
    head2 = load_native_head(single, model)
    assert torch.equal(head2.layers[0].post_norm.weight, head.layers[0].post_norm.weight)


def test_wrapper_config_and_bad_files(tmp_path):
    wrapper = {"model_type": "qwen3_5", "text_config": {"num_hidden_layers": 3}}
    (tmp_path / "config.json").write_text(json.dumps(wrapper))
    assert base_layers(tmp_path) == 3
    with pytest.raises(BebopError, match="no model.safetensors.index.json or model.safetensors"):
        weight_map(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\1" * 12)
    with pytest.raises(BebopError, match="corrupt or truncated safetensors"):
        weight_map(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(BebopError, match="has no weight_map"):
        weight_map(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(BebopError, match="cannot read model config"):
        base_layers(tmp_path)
    with pytest.raises(BebopError, match="model directory not found"):
        native_keys(tmp_path / "nope")
