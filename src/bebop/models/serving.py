"""How vLLM and SGLang serve a model directory's native MTP layer with lossless probabilistic verification.

Both engines treat the checkpoint's own MTP weights as the draft model. They keep outputs exactly on the
policy's distribution only when drafts are *sampled* from q and verified by rejection sampling (DESIGN §3).
vLLM's default is different: it drafts greedily and treats q as one-hot, so acceptance falls to p(argmax q),
the TO rule. The flags below select the RS rule:

* vLLM (``vllm/config/speculative.py``): ``--speculative-config`` with ``method = "mtp"`` (the engine picks
  the family's MTP class from the checkpoint), ``num_speculative_tokens = γ`` and
  ``draft_sample_method = "probabilistic"``.
* SGLang (``server_args.py``): ``--speculative-algorithm NEXTN`` (its MTP algorithm), ``--speculative-num-steps γ``,
  ``--speculative-eagle-topk 1`` (a chain, not a tree), ``--speculative-num-draft-tokens γ+1`` and
  ``--speculative-use-rejection-sampling``.

A head of L layers drafts step k with layer (k−1) mod L in both engines, as Bebop trains it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from bebop.config import check_gamma

# model_type of a checkpoint -> whether each engine has an MTP architecture for it
SERVABLE_MTP = {
    "deepseek_v3": ("vllm", "sglang"),
    "kimi_k25": ("vllm", "sglang"),
    "glm4_moe": ("vllm", "sglang"),
    "qwen3_next": ("vllm", "sglang"),
    "qwen3_5": ("vllm", "sglang"),
    "qwen3_5_text": ("vllm", "sglang"),
    "qwen3_5_moe": ("vllm", "sglang"),
    "qwen3_5_moe_text": ("vllm", "sglang"),
}


@dataclass(frozen=True)
class ServeCommands:
    """The two launch commands for one exported model directory."""

    vllm: str
    sglang: str

    def lines(self) -> list[str]:
        return [f"vLLM:   {self.vllm}", f"SGLang: {self.sglang}"]


def serve_commands(model_dir: str, gamma: int) -> ServeCommands:
    """Launch commands that serve ``model_dir`` with its MTP layer drafting ``gamma`` tokens per step and
    rejection-sampling verification (outputs follow the model's own distribution)."""
    check_gamma(gamma)
    spec = {"method": "mtp", "num_speculative_tokens": gamma, "draft_sample_method": "probabilistic"}
    path = shlex.quote(str(model_dir))
    vllm = f"vllm serve {path} --speculative-config {shlex.quote(json.dumps(spec))}"
    sglang = (
        f"python -m sglang.launch_server --model-path {path} --speculative-algorithm NEXTN "
        f"--speculative-num-steps {gamma} --speculative-eagle-topk 1 --speculative-num-draft-tokens {gamma + 1} "
        "--speculative-use-rejection-sampling"
    )
    return ServeCommands(vllm=vllm, sglang=sglang)
