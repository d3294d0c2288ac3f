"""``bebop export``: a model directory with the head merged in as its native MTP layer, and the serving flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.render import console
from bebop.errors import BebopError

SHARD_SIZE = re.compile(r"\s*(\d+(\.\d*)?)\s*(KB|MB|GB|TB)\s*", re.IGNORECASE)


def check_shard_size(text: str) -> str:
    """``--max-shard-size`` as huggingface_hub reads it: a positive number and a unit KB, MB, GB or TB."""
    m = SHARD_SIZE.fullmatch(text)
    if m is None or not float(m.group(1)) > 0:
        raise BebopError(f"--max-shard-size must be a positive size with a unit KB, MB, GB or TB (like 5GB), "
                         f"got {text!r}")
    return text


def export_cmd(
    model: Annotated[Path, typer.Option(help="Model checkpoint directory (config, weights, tokenizer).")],
    out: Annotated[Path, typer.Option(help="New directory for the merged checkpoint.")],
    mtp: Annotated[str, typer.Option(
        help="Head to merge: a head directory or .safetensors file, or 'native' (the checkpoint's own).")] = "native",
    gamma: Annotated[int, typer.Option(help="Draft tokens per step in the printed serving flags.")] = 3,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard of the head's new tensors (the checkpoint's "
                                                     "own shards are copied as they are).")] = "5GB",
) -> None:
    """Write MODEL with the MTP head merged in the family's native layout (sharded safetensors, index, config key,
    tokenizer), then print the vLLM and SGLang flags that draft with it under lossless rejection sampling."""
    from bebop.config import check_gamma
    from bebop.models.export import export_model
    from bebop.models.serving import serve_commands

    check_gamma(gamma)
    check_shard_size(max_shard_size)
    done = export_model(model, mtp, out, max_shard_size)
    console.print(f"wrote [bold]{done.out}[/]: {done.num_layers} MTP layer(s) in the {done.layout} layout, "
                  f"{done.dtype} weights")
    console.print("serve with MTP drafts verified by rejection sampling (outputs follow the model's distribution):")
    for line in serve_commands(str(done.out), gamma).lines():
        console.print(line, highlight=False, soft_wrap=True, markup=False)
