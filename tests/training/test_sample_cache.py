"""The on-disk sample cache: reuse, resumption after an interruption, key misses, rank-independent rows (two fake
ranks in threads) and corrupt chunks. ``generate`` is a fake sampler seeded only by the seed it is given."""

from __future__ import annotations

import copy
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bebop.training.sample_cache as sc
from bebop.errors import BebopError
from bebop.training.distributed import Dist
from bebop.training.sample_cache import (
    cache_entry,
    cache_key,
    cached_samples,
    chunk_seed,
    model_fingerprint,
    plan_rounds,
    prompts_digest,
)

KEY = {"model": {"config_sha256": "abc", "weights": []}, "temperature": 1.0, "max_new_tokens": 6, "eos_id": 2,
       "pad_id": 0}
PROMPTS = [[1, 10 + i, 20 + i % 3] for i in range(23)]  # 23 prompts in chunks of 5: 4 full chunks and one of 3


class Interrupt(Exception):
    pass


class FakeSampler:
    """Completions of 1-6 tokens drawn from a generator seeded by ``seed`` alone; counts calls and sampled
    prompts; raises :class:`Interrupt` on call number ``fail_at`` (1-based) to simulate a crash."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.prompts, self.fail_at, self.seeds = 0, 0, fail_at, []
        self.lock = threading.Lock()

    def __call__(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        with self.lock:
            self.calls += 1
            if self.fail_at is not None and self.calls == self.fail_at:
                raise Interrupt
            self.prompts += len(prompts)
            self.seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in prompts:
            n = int(torch.randint(1, 7, (1,), generator=g))
            out.append(torch.randint(3, 60, (n,), generator=g).tolist())
        return out


def run(tmp_path, gen, prompts=PROMPTS, key=KEY, seed=7, chunk_size=5, cache=True, dist=None):
    kw = {} if dist is None else {"dist": dist}
    return cached_samples(prompts, gen, key_parts=key, cache_dir=tmp_path / "cache" if cache else None,
                          chunk_size=chunk_size, seed=seed, label="test samples", **kw)


def chunk_files(tmp_path, key=KEY, prompts=PROMPTS, seed=7, chunk_size=5):
    return sorted(cache_entry(tmp_path / "cache", key, prompts, chunk_size, seed).glob("chunk-*.safetensors"))


def test_rows_are_prompt_plus_completion_in_prompt_order(tmp_path):
    gen = FakeSampler()
    rows = run(tmp_path, gen)
    assert len(rows) == len(PROMPTS) and gen.calls == 5 and gen.prompts == 23
    for (ids, n), p in zip(rows, PROMPTS, strict=True):
        assert n == len(p) and ids[:n] == p and 1 <= len(ids) - n <= 6
    assert gen.seeds == [chunk_seed(7, c) for c in range(5)]


def test_second_call_reuses_every_chunk(tmp_path):
    first = run(tmp_path, FakeSampler())
    gen = FakeSampler()
    assert run(tmp_path, gen) == first
    assert gen.calls == 0
    assert len(chunk_files(tmp_path)) == 5


def test_meta_json_names_the_key_parts(tmp_path):
    run(tmp_path, FakeSampler())
    entry = cache_entry(tmp_path / "cache", KEY, PROMPTS, 5, 7)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] == entry.name
    assert meta["temperature"] == 1.0 and meta["seed"] == 7 and meta["chunk_size"] == 5 and meta["n_chunks"] == 5
    assert meta["prompts_sha256"] == prompts_digest(PROMPTS) and meta["model"] == KEY["model"]
    assert meta["format"] == sc.FORMAT_VERSION and meta["label"] == "test samples"


@pytest.mark.parametrize("k", [1, 3])
def test_resume_after_interruption_generates_only_the_rest(tmp_path, k):
    reference = run(tmp_path / "ref", FakeSampler())
    with pytest.raises(Interrupt):
        run(tmp_path, FakeSampler(fail_at=k + 1))  # k chunks finish, the (k+1)-th crashes
    assert len(chunk_files(tmp_path)) == k
    gen = FakeSampler()
    assert run(tmp_path, gen) == reference
    assert gen.calls == 5 - k and gen.prompts == 23 - 5 * k


def test_no_cache_dir_gives_the_same_rows_and_writes_nothing(tmp_path):
    cached = run(tmp_path / "a", FakeSampler())
    gen = FakeSampler()
    assert run(tmp_path / "b", gen, cache=False) == cached
    assert gen.calls == 5 and not (tmp_path / "b").exists()


def fingerprinted_model(tmp_path):
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"hidden_size": 32}')
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_model_fingerprint_hashes_the_config_and_lists_weight_files(tmp_path):
    d = fingerprinted_model(tmp_path)
    (d / "model.safetensors.index.json").write_text("{}")
    fp = model_fingerprint(d)
    assert [w["name"] for w in fp["weights"]] == ["model.safetensors", "model.safetensors.index.json"]
    assert fp["weights"][0]["size"] == 7
    assert fp["weights"][0]["mtime_ns"] == (d / "model.safetensors").stat().st_mtime_ns
    (d / "config.json").write_text('{"hidden_size": 64}')
    assert model_fingerprint(d)["config_sha256"] != fp["config_sha256"]
    with pytest.raises(BebopError, match="model directory not found: .*nowhere"):
        model_fingerprint(tmp_path / "nowhere")
    (d / "config.json").unlink()
    with pytest.raises(BebopError, match="has no config.json"):
        model_fingerprint(d)


def test_cache_key_is_canonical_and_rejects_non_json():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 1.5})
    with pytest.raises(BebopError, match="plain JSON"):
        cache_key({"a": object()})
    assert prompts_digest([[1, 2], [3]]) != prompts_digest([[1], [2, 3]])


@pytest.mark.parametrize("change", ["temperature", "prompts", "model mtime", "seed", "chunk size", "top_p"])
def test_a_different_key_misses(tmp_path, change):
    d = fingerprinted_model(tmp_path)
    key = {**KEY, "model": model_fingerprint(d)}
    run(tmp_path, FakeSampler(), key=key)
    prompts, seed, chunk = PROMPTS, 7, 5
    if change == "temperature":
        key = {**key, "temperature": 0.7}
    elif change == "prompts":
        prompts = [*PROMPTS[:-1], [1, 99]]
    elif change == "model mtime":
        st = (d / "model.safetensors").stat()
        os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        key = {**key, "model": model_fingerprint(d)}
    elif change == "seed":
        seed = 8
    elif change == "chunk size":
        chunk = 4
    else:
        key = {**key, "top_p": 0.9}
    gen = FakeSampler()
    run(tmp_path, gen, prompts=prompts, key=key, seed=seed, chunk_size=chunk)
    assert gen.prompts == len(prompts)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_plan_rounds_is_round_robin():
    assert plan_rounds([0, 2, 3, 4, 7], 2) == [[0, 2], [3, 4], [7, None]]
    assert plan_rounds([5], 3) == [[5, None, None]]
    assert plan_rounds([], 4) == []
    assert plan_rounds([1, 2], 1) == [[1], [2]]
    with pytest.raises(BebopError, match="world size must be at least 1, got 0"):
        plan_rounds([1], 0)


class ThreadGroup:
    """``gather_objects`` / ``broadcast_object`` for ranks that are threads of this process (objects are deep-copied,
    as pickling would); records which rank performed each file write."""

    def __init__(self, world: int):
        self.world, self.barrier = world, threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world
        self.local = threading.local()
        self.writers: list[int] = []

    def gather_objects(self, obj, dist):
        self.barrier.wait()
        self.slots[dist.rank] = copy.deepcopy(obj)
        self.barrier.wait()
        out = copy.deepcopy(self.slots)
        self.barrier.wait()
        return out

    def broadcast_object(self, obj, dist, src=0):
        return self.gather_objects(obj, dist)[src]


def run_ranks(tmp_path, monkeypatch, world, gen, **kw):
    group = ThreadGroup(world)
    monkeypatch.setattr(sc, "gather_objects", group.gather_objects)
    monkeypatch.setattr(sc, "broadcast_object", group.broadcast_object)
    real_write, real_json = sc.atomic_write, sc.atomic_write_json

    def write(*a, **k):
        group.writers.append(group.local.rank)
        return real_write(*a, **k)

    def write_json(*a, **k):
        group.writers.append(group.local.rank)
        return real_json(*a, **k)

    monkeypatch.setattr(sc, "atomic_write", write)
    monkeypatch.setattr(sc, "atomic_write_json", write_json)

    def rank(r):
        group.local.rank = r
        return run(tmp_path, gen, dist=Dist(r, world, r), **kw)

    with ThreadPoolExecutor(world) as pool:
        results = list(pool.map(rank, range(world)))
    return results, group


@pytest.mark.parametrize("world", [2, 3])
def test_rows_do_not_depend_on_the_number_of_ranks(tmp_path, monkeypatch, world):
    reference = run(tmp_path / "one", FakeSampler(), cache=False)
    gen = FakeSampler()
    results, group = run_ranks(tmp_path, monkeypatch, world, gen)
    assert all(r == reference for r in results)
    assert gen.calls == 5 and sorted(gen.seeds) == sorted(chunk_seed(7, c) for c in range(5))
    assert group.writers and set(group.writers) == {0}  # meta.json and the 5 chunks, all by rank 0
    assert len(chunk_files(tmp_path)) == 5


def test_two_ranks_resume_a_single_process_run(tmp_path, monkeypatch):
    reference = run(tmp_path / "ref", FakeSampler())
    with pytest.raises(Interrupt):
        run(tmp_path, FakeSampler(fail_at=3))
    gen = FakeSampler()
    results, _ = run_ranks(tmp_path, monkeypatch, 2, gen)
    assert results == [reference, reference] and gen.calls == 3


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_garbage(path):
    path.write_text("not a safetensors file")


def corrupt_empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_flip_last_byte, corrupt_garbage, corrupt_empty])
def test_a_corrupt_chunk_is_generated_again(tmp_path, corrupt):
    reference = run(tmp_path, FakeSampler())
    target = chunk_files(tmp_path)[2]
    corrupt(target)
    gen = FakeSampler()
    assert run(tmp_path, gen) == reference
    assert gen.calls == 1 and gen.seeds == [chunk_seed(7, 2)]
    gen = FakeSampler()
    assert run(tmp_path, gen) == reference and gen.calls == 0  # the rewritten chunk is trusted again


def test_a_chunk_file_from_another_position_is_not_trusted(tmp_path):
    reference = run(tmp_path, FakeSampler())
    files = chunk_files(tmp_path)
    files[1].write_bytes(files[0].read_bytes())  # a valid file, but chunk 0's
    gen = FakeSampler()
    assert run(tmp_path, gen) == reference and gen.seeds == [chunk_seed(7, 1)]


def test_chunk_seeds_are_distinct_across_neighbouring_seeds():
    seeds = {chunk_seed(s, c) for s in range(20) for c in range(20)}
    assert len(seeds) == 400 and all(0 <= x < 2**63 for x in seeds)
    assert chunk_seed(3, 1) == chunk_seed(3, 1)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(BebopError, match="chunk_size must be at least 1, got 0"):
        run(tmp_path, FakeSampler(), chunk_size=0)
    with pytest.raises(BebopError, match="no prompts to sample for test samples"):
        run(tmp_path, FakeSampler(), prompts=[])
    with pytest.raises(BebopError, match="returned 1 completions for 5 prompts"):
        run(tmp_path, lambda prompts, seed: [[3]])
