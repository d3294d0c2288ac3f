"""A resumable on-disk cache of policy samples (DESIGN §4: the head trains on the policy's own samples at the
rollout temperature and length), generated in fixed chunks so that a crash loses at most one chunk per rank.

Layout: ``CACHE_DIR/<key>/meta.json`` (the key parts, human-readable) and ``chunk-000000.safetensors`` … (flat
int32 token ids, int64 row offsets and int32 prompt lengths; no pickle). ``<key>`` is :func:`cache_key` of the
model fingerprint, the prompts, the sampling settings, the seed, the chunk size and the format version, so a
change in any of them starts a fresh entry instead of reusing stale samples.

Chunk ``c`` holds ``prompts[c*chunk_size:(c+1)*chunk_size]`` sampled with seed :func:`chunk_seed` ``(seed, c)``,
so the rows are the same whatever the number of ranks, the order chunks run in, or where a run was resumed."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bebop.errors import BebopError
from bebop.io import atomic_write, atomic_write_json
from bebop.training.distributed import SINGLE, Dist, broadcast_object, gather_objects

FORMAT_VERSION = 1  # bump when the chunk layout or the seeding changes: old entries then miss instead of misreading
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")

Row = tuple[list[int], int]
Generate = Callable[[list[list[int]], int], list[list[int]]]


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """What identifies a saved model's weights without reading them: the sha256 of ``config.json`` and each
    weight file's (``*.safetensors``, ``*.bin`` and their index JSON) name, size and mtime_ns. Re-saving the
    weights changes the mtime and so the fingerprint (a harmless miss); hashing gigabytes of weights per run would
    cost more than it saves. A model without a directory needs a fingerprint from its caller."""
    path = Path(model_dir)
    if not path.is_dir():
        raise BebopError(f"model directory not found: {path} (cannot fingerprint it for the sample cache)")
    config = path / "config.json"
    if not config.is_file():
        raise BebopError(f"model directory {path} has no config.json (cannot fingerprint it for the sample cache)")
    weights = []
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            st = f.stat()
            weights.append({"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(), "weights": weights}


def prompts_digest(prompts: Sequence[Sequence[int]]) -> str:
    """sha256 of the prompt id lists, in order (lengths included, so ``[[1, 2], [3]]`` ≠ ``[[1], [2, 3]]``)."""
    h = hashlib.sha256()
    h.update(np.asarray([len(p) for p in prompts], dtype=np.int64).tobytes())
    for p in prompts:
        h.update(np.asarray(p, dtype=np.int64).tobytes())
    return h.hexdigest()


def _canonical(parts: dict[str, Any]) -> str:
    try:
        return json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BebopError(f"sample cache key parts must be plain JSON values: {e}") from None


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 (hex) of ``parts`` as canonical JSON (sorted keys): equal settings give the same key on every
    machine and Python version."""
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk ``chunk`` of a run seeded ``seed``: a hash of both (63 bits), so runs seeded
    ``s`` and ``s + 1`` do not share chunks' randomness the way ``seed + chunk`` would."""
    digest = hashlib.sha256(f"bebop-sample-chunk:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def plan_rounds(missing: Sequence[int], world: int) -> list[list[int | None]]:
    """Round-robin work plan: ``rounds[r][rank]`` is the chunk rank ``rank`` generates in round ``r`` (``None``
    when it idles in the last round). Every rank calls the collectives once per round, so they stay in step."""
    if world < 1:
        raise BebopError(f"world size must be at least 1, got {world}")
    return [[missing[i] if i < len(missing) else None for i in range(r, r + world)]
            for r in range(0, len(missing), world)]


def _full_parts(key_parts: dict[str, Any], prompts: Sequence[Sequence[int]], chunk_size: int,
                seed: int) -> dict[str, Any]:
    return {**key_parts, "prompts_sha256": prompts_digest(prompts), "n_prompts": len(prompts), "seed": seed,
            "chunk_size": chunk_size, "format": FORMAT_VERSION}


def _chunk_path(entry: Path, chunk: int) -> Path:
    return entry / f"chunk-{chunk:06d}.safetensors"


def _content_sha(ids: np.ndarray, offsets: np.ndarray, lens: np.ndarray) -> str:
    return hashlib.sha256(ids.tobytes() + offsets.tobytes() + lens.tobytes()).hexdigest()


def _write_chunk(path: Path, key: str, chunk: int, rows: list[Row]) -> None:
    ids = np.asarray([t for r, _ in rows for t in r], dtype=np.int32)
    offsets = np.cumsum([0] + [len(r) for r, _ in rows], dtype=np.int64)
    lens = np.asarray([n for _, n in rows], dtype=np.int32)
    meta = {"key": key, "chunk": str(chunk), "rows": str(len(rows)), "sha256": _content_sha(ids, offsets, lens)}
    tensors = {name: torch.from_numpy(a) for name, a in (("ids", ids), ("offsets", offsets), ("prompt_lens", lens))}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _read_chunk(path: Path, key: str, chunk: int, prompts: Sequence[Sequence[int]]) -> list[Row] | None:
    """The rows of a finished chunk file, or ``None`` when it is absent or not exactly what this run would write
    (unreadable, another key or chunk, wrong row count, a checksum mismatch, or rows whose prompt part is not the
    chunk's prompts)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids, offsets, lens = (f.get_tensor(k).numpy() for k in ("ids", "offsets", "prompt_lens"))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None
    n = len(prompts)
    if (meta.get("key") != key or meta.get("chunk") != str(chunk) or meta.get("rows") != str(n)
            or ids.dtype != np.int32 or offsets.dtype != np.int64 or lens.dtype != np.int32
            or offsets.shape != (n + 1,) or lens.shape != (n,) or ids.ndim != 1
            or meta.get("sha256") != _content_sha(ids, offsets, lens)):
        return None
    if offsets[0] != 0 or offsets[-1] != len(ids) or (np.diff(offsets) < 0).any():
        return None
    flat = ids.tolist()
    rows = [(flat[offsets[i]:offsets[i + 1]], int(lens[i])) for i in range(n)]
    if any(n_p != len(p) or r[:n_p] != list(p) for (r, n_p), p in zip(rows, prompts, strict=True)):
        return None
    return rows


def _generate_chunk(generate: Generate, prompts: list[list[int]], seed: int, chunk: int) -> list[Row]:
    completions = generate(prompts, chunk_seed(seed, chunk))
    if len(completions) != len(prompts):
        raise BebopError(f"the sampler returned {len(completions)} completions for {len(prompts)} prompts "
                         f"(chunk {chunk})")
    return [([*map(int, p), *map(int, c)], len(p)) for p, c in zip(prompts, completions, strict=True)]


def _progress(label: str, dist: Dist) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total} chunks"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not dist.is_main,
    )


def cached_samples(prompts: list[list[int]], generate: Generate, *, key_parts: dict[str, Any],
                   cache_dir: Path | None, chunk_size: int, seed: int, dist: Dist = SINGLE,
                   label: str = "samples") -> list[Row]:
    """One sample per prompt, as rows ``(prompt ids + completion ids, prompt length)`` in prompt order, read from
    ``cache_dir`` where a previous (possibly interrupted) run finished them and generated otherwise.

    ``generate(prompts, seed) -> completions`` samples one chunk from a generator seeded by ``seed`` alone.
    ``key_parts`` names everything else that changes the samples (model fingerprint, temperature, top-p/top-k,
    max_new_tokens, eos/pad ids); the prompts, seed, chunk size and format version are added here.

    Every rank calls this with the same arguments. Rank 0 finds the finished chunks and broadcasts the missing
    ones; ranks take them round-robin (:func:`plan_rounds`); after each round rank 0 gathers the round's chunks
    and writes them atomically (only rank 0 writes); at the end every rank gets all rows from rank 0.
    ``cache_dir=None`` generates everything (same chunks and seeds, so the same rows) and writes nothing. A chunk
    file that is corrupt or does not match is generated again and replaced, never trusted."""
    if chunk_size < 1:
        raise BebopError(f"chunk_size must be at least 1, got {chunk_size}")
    if not prompts:
        raise BebopError(f"no prompts to sample for {label}")
    n_chunks = (len(prompts) + chunk_size - 1) // chunk_size
    bounds = [(c * chunk_size, min((c + 1) * chunk_size, len(prompts))) for c in range(n_chunks)]
    parts = _full_parts(key_parts, prompts, chunk_size, seed)
    key = cache_key(parts)
    entry = Path(cache_dir) / key if cache_dir is not None else None

    done: dict[int, list[Row]] = {}
    if dist.is_main and entry is not None:
        atomic_write_json(entry / "meta.json", {"key": key, "label": label, "n_chunks": n_chunks, **parts})
        for c, (a, b) in enumerate(bounds):
            rows = _read_chunk(_chunk_path(entry, c), key, c, prompts[a:b])
            if rows is not None:
                done[c] = rows
            elif _chunk_path(entry, c).exists():
                Console(stderr=True).print(f"[yellow]{label}: chunk {c} in {entry} is corrupt or stale; "
                                           "generating it again")
    missing = broadcast_object([c for c in range(n_chunks) if c not in done], dist)

    with _progress(label, dist) as progress:
        bar = progress.add_task(label, total=n_chunks, completed=n_chunks - len(missing), rate="")
        start, fresh = time.perf_counter(), 0
        for assignment in plan_rounds(missing, dist.world):
            mine = assignment[dist.rank]
            result = None
            if mine is not None:
                a, b = bounds[mine]
                result = (mine, _generate_chunk(generate, prompts[a:b], seed, mine))
            for item in gather_objects(result, dist):
                if item is None:
                    continue
                c, rows = item
                fresh += len(rows)
                if dist.is_main:
                    done[c] = rows
                    if entry is not None:
                        _write_chunk(_chunk_path(entry, c), key, c, rows)
            rate = fresh / max(time.perf_counter() - start, 1e-9)
            progress.update(bar, advance=sum(x is not None for x in assignment), rate=f"{rate:.1f} samples/s")

    rows = [r for c in range(n_chunks) for r in done[c]] if dist.is_main else None
    return broadcast_object(rows, dist)


def cache_entry(cache_dir: Path, key_parts: dict[str, Any], prompts: list[list[int]], chunk_size: int,
                seed: int) -> Path:
    """The directory :func:`cached_samples` uses for these arguments (for tools and tests that inspect it)."""
    return Path(cache_dir) / cache_key(_full_parts(key_parts, prompts, chunk_size, seed))

