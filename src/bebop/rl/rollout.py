"""The rollout side of RL (DESIGN §5): a worker that holds a copy of the policy (and MTP head), samples G
completions per prompt through the engine, grades them, and hands back plain CPU data; and the backends
that run workers in-process (synchronously or on a background thread) or as Ray actors.

A rollout for RL step ``s`` is fully determined by (config, s, the pushed weights): its prompts come from
the problem stream seeded by (seed, s), or for a user's prompts from the seeded per-epoch permutation of
:func:`bebop.rl.data.step_positions`, and its sampling generator is seeded by (seed, s) plus the offset of the
worker's first prompt, so a resumed run, and a Ray run with one worker, reproduce a local run's rollouts
(W > 1 workers sample their shards with W different generators).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import DecodeMetrics
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.mtp import MTPHead
from bebop.models.policy import load_policy
from bebop.rl.config import RLConfig
from bebop.rl.data import UserPrompts, load_user_prompts, reward_inputs, step_positions
from bebop.rl.rewards import Rewards, Row
from bebop.tasks import Problem, get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env


@dataclass
class RolloutBatch:
    """One RL step's rollouts, on the CPU: rows are grouped prompt by prompt (G consecutive rows)."""

    step: int
    version: int                       # policy version (optimizer steps taken) that sampled these rows
    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: list[list[float]]        # behaviour log p_τ of each completion token (from the target pass)
    rewards: list[float]
    entropy_sum: float                 # Σ per-token target entropy over completion tokens
    metrics: DecodeMetrics = field(default_factory=DecodeMetrics)
    seconds: float = 0.0               # wall time of the slowest worker
    sampled: list[list[int]] | None = None   # multi-turn: 1 = model token, 0 = environment token (no loss)
    retries: list[dict] = field(default_factory=list)   # Ray: shards re-run on a fresh worker after one died
    reward_parts: dict[str, list[float | None]] | None = None   # --reward: each function's value per row

    @property
    def num_tokens(self) -> int:
        """Tokens the policy sampled (environment tokens excluded)."""
        if self.sampled is not None:
            return sum(sum(m) for m in self.sampled)
        return sum(len(c) for c in self.completions)


def step_seed(seed: int, step: int) -> int:
    """The seed of RL step ``step``'s prompts and sampling generator: a pure function of (run seed, step)."""
    return seed * 1_000_003 + step


def load_prompts_for(cfg: RLConfig, tokenizer, model) -> UserPrompts:
    """``cfg``'s user prompts (``--prompts`` / ``--dataset``), those that leave room for ``max_new_tokens`` in the
    policy's context, split into training and held-out prompts (held out only when ``eval_samples`` > 0)."""
    from bebop.training.samples import context_length

    room = context_length(model) - cfg.max_new_tokens
    if room < 1:
        raise BebopError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the policy's context "
                         f"of {context_length(model)} positions")
    return load_user_prompts(cfg.source, tokenizer, room, cfg.eval_samples, cfg.seed)


def task_columns(problems: list[Problem]) -> dict[str, list]:
    """A task's problem fields as reward-function columns: ``answer`` and each key of ``Problem.data``."""
    keys = dict.fromkeys(k for p in problems for k in p.data if k not in ("answer", "prompts", "completions",
                                                                          "completion_ids"))
    return {"answer": [p.answer for p in problems], **{k: [p.data.get(k) for p in problems] for k in keys}}


class RolloutWorker:
    """Holds the behaviour policy (+ head). ``set_weights`` then ``rollout(step, version)``. ``data``: the user's
    prompts when already loaded (the trainer hands its copy over); otherwise loaded here when ``cfg`` has some."""

    def __init__(self, cfg: RLConfig, data: UserPrompts | None = None) -> None:
        if cfg.rollout_threads:
            torch.set_num_threads(cfg.rollout_threads)
        self.cfg = cfg
        self.task = None if cfg.user_prompts else get_task(cfg.task)
        self.rewards = Rewards(cfg.reward, cfg.reward_weights) if cfg.reward else None
        self.model, self.tokenizer = load_policy(cfg.model, cfg.device, cfg.dtype)
        self.data = data if data is not None or not cfg.user_prompts else \
            load_prompts_for(cfg, self.tokenizer, self.model)
        self.head = None
        if cfg.use_mtp:
            self.head = load_head(cfg.mtp, self.model) if cfg.mtp else MTPHead.from_base(self.model)
            self.head = self.head.to(cfg.device).eval()
        self.params = SamplingParams(temperature=cfg.temperature)
        self.multi_turn = self.task is not None and is_multi_turn(self.task)
        self.stop_id = self.tokenizer.convert_tokens_to_ids(self.task.terminator) if self.multi_turn else None

    def set_weights(self, policy_state: dict, head_state: dict | None = None) -> None:
        """Copy pushed weights in place (the head stays bound to this worker's embedding and LM head)."""
        self.model.load_state_dict(policy_state)
        if head_state is not None and self.head is not None:
            self.head.load_state_dict(head_state)

    @torch.inference_mode()
    def rollout(self, step: int, version: int, offset: int = 0, count: int | None = None) -> RolloutBatch:
        """Rollouts of step ``step`` for its prompts [offset, offset + count) (all by default)."""
        s = self.cfg
        t0 = time.perf_counter()
        end = None if count is None else offset + count
        if self.data is None:
            problems = sample_problems(self.task, s.prompts_per_step, step_seed(s.seed, step))[offset:end]
            prompt_ids = [self.tokenizer(p.prompt)["input_ids"] for p in problems]
        else:
            positions = step_positions(len(self.data.train), s.prompts_per_step, s.seed, step)[offset:end]
            picks = [self.data.train[k] for k in positions]
            prompt_ids = [self.data.ids[p] for p in picks]
        prompts = [ids for ids in prompt_ids for _ in range(s.group_size)]
        gen = torch.Generator(device=self.model.device).manual_seed(step_seed(s.seed, step) + offset)
        tok = self.tokenizer
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        sampled: list[list[int]] | None = [] if self.multi_turn else None
        entropy_sum = 0.0
        metrics = DecodeMetrics()
        turns = None
        if self.multi_turn:
            turns = Turns(task_env(self.task, tok, [p for p in problems for _ in range(s.group_size)]), self.stop_id)
        dc = DecodeConfig(self.params, s.max_new_tokens, tok.eos_token_id, s.gamma, s.rule, tok.pad_token_id, gen)
        r = decode(self.model, self.head, prompts, dc, turns, s.rollout_batch or None)   # continuous with B slots
        if sampled is not None:                     # multi-turn: environment replies prefilled, not sampled
            sampled += [m[:n].tolist() for m, n in zip(r.sampled.cpu(), r.lengths.tolist(), strict=True)]
        completions += r.completions()
        logprobs += [row[:n].tolist() for row, n in zip(r.logprobs.cpu(), r.lengths.tolist(), strict=True)]
        entropy_sum += float((r.entropy * r.sampled_mask).sum())
        metrics.merge(r.metrics)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        first_row = offset * s.group_size
        if self.data is not None:
            rewards, parts = self.grade_user(picks, texts, completions, first_row)
        else:
            rewards, parts = self.grade_task(problems, texts, completions, first_row)
        return RolloutBatch(
            step=step, version=version, prompts=prompts, completions=completions, logprobs=logprobs,
            rewards=rewards, entropy_sum=entropy_sum, metrics=metrics, seconds=time.perf_counter() - t0,
            sampled=sampled, reward_parts=parts,
        )

    def grade_user(self, picks: list[int], texts: list[str], completion_ids: list[list[int]],
                   first_row: int) -> tuple[list[float], dict]:
        """The ``--reward`` functions on the completions of the user's prompts ``picks`` (G rows each)."""
        prompts, completions, columns, rows = reward_inputs(self.data, picks, texts, self.cfg.group_size)
        return self.rewards.score(prompts, completions, completion_ids, columns, _offset_rows(rows, first_row))

    def grade_task(self, problems: list[Problem], texts: list[str], completion_ids: list[list[int]],
                   first_row: int) -> tuple[list[float], dict | None]:
        """The task's own reward, or the ``--reward`` functions with the problem fields as columns."""
        rows_of = [p for p in problems for _ in range(self.cfg.group_size)]
        if self.rewards is None:
            return [float(self.task.reward(p, t)) for p, t in zip(rows_of, texts, strict=True)], None
        rows = _offset_rows([Row(p.prompt) for p in rows_of], first_row)
        return self.rewards.score([p.prompt for p in rows_of], texts, completion_ids, task_columns(rows_of), rows)

    def run(self, step: int, version: int, weights: tuple, offset: int = 0, count: int | None = None) -> RolloutBatch:
        """``set_weights(*weights)`` then ``rollout`` (one remote call per step for Ray actors)."""
        self.set_weights(*weights)
        return self.rollout(step, version, offset, count)


def _offset_rows(rows: list[Row], first: int) -> list[Row]:
    """``rows`` with each described by its row number in the whole step (a Ray shard's first row is ``first``)."""
    if not first:
        return rows
    return [Row(r.prompt, f"{r.source + ', ' if r.source else ''}row {first + i} of the step") for i, r in
            enumerate(rows)]


def snapshot(module: torch.nn.Module | None) -> dict | None:
    """A detached copy of ``module``'s own weights, safe to hand to another thread or process."""
    if module is None:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class LocalBackend:
    """In-process worker. ``threaded=False``: ``submit`` runs the rollout at once (synchronous RL);
    ``threaded=True``: on one background thread, so rollouts overlap training (asynchronous RL)."""

    def __init__(self, cfg: RLConfig, threaded: bool, data: UserPrompts | None = None) -> None:
        self.worker = RolloutWorker(cfg, data)
        self.pool = ThreadPoolExecutor(max_workers=1) if threaded else None

    def submit(self, step: int, version: int, policy_state: dict, head_state: dict | None) -> Future:
        """Step ``step``'s rollouts sampled by these weights (policy ``version``), as a future."""
        if self.pool is not None:
            return self.pool.submit(self.worker.run, step, version, (policy_state, head_state))
        fut: Future = Future()
        fut.set_result(self.worker.run(step, version, (policy_state, head_state)))
        return fut

    def close(self) -> None:
        """Wait for the background rollout, if any, and stop its thread."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class _RayFuture:
    """The Ray workers' shards of one step, merged into one batch on ``result()``. A shard whose worker died
    mid-step (its process crashed or was killed) is re-run on a fresh worker, up to ``backend.retries`` times;
    the shard is a pure function of (step, weights, offset), so the retried step equals the one that would have
    been. Each retry is recorded in the batch's ``retries``."""

    def __init__(self, backend: RayBackend, step: int, version: int, weights) -> None:
        self.backend, self.step, self.version, self.weights = backend, step, version, weights
        self.shards = [backend.launch(i, step, version, weights) for i in range(len(backend.actors))]

    def result(self) -> RolloutBatch:
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        parts, retries = [], []
        for i, (actor, ref) in enumerate(self.shards):
            attempt = 0
            while True:
                try:
                    parts.append(self.backend.ray.get(ref))
                    break
                except RayTaskError as e:     # a BebopError in the worker (a failing reward): the error itself
                    if isinstance(e.cause, BebopError):
                        raise type(e.cause)(str(e.cause)) from None
                    raise
                except (RayActorError, WorkerCrashedError) as e:
                    reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]
                    if attempt >= self.backend.retries:
                        raise BebopError(f"Ray rollout worker {i} died during the rollouts of step {self.step} "
                                         f"({reason}), {attempt} retries used (rollout_retries = "
                                         f"{self.backend.retries})") from None
                    attempt += 1
                    retries.append({"worker": i, "attempt": attempt, "error": reason})
                    self.backend.replace(i, actor)
                    actor, ref = self.backend.launch(i, self.step, self.version, self.weights)
        batch = merge_batches(parts, self.step, self.version)
        batch.retries = retries
        return batch


def merge_batches(parts: list[RolloutBatch], step: int, version: int) -> RolloutBatch:
    """Concatenate workers' shards of one step (in worker order); decode counters are summed. Multi-turn
    shards keep their per-row ``sampled`` masks, so environment tokens stay out of the loss after merging."""
    multi_turn = {p.sampled is not None for p in parts}
    if len(multi_turn) > 1:
        raise BebopError("cannot merge multi-turn rollout shards with single-turn ones")
    out = RolloutBatch(step=step, version=version, prompts=[], completions=[], logprobs=[], rewards=[],
                       entropy_sum=0.0, seconds=max(p.seconds for p in parts),
                       sampled=[] if multi_turn == {True} else None,
                       reward_parts=None if parts[0].reward_parts is None else {k: [] for k in parts[0].reward_parts})
    for p in parts:
        out.prompts += p.prompts
        out.completions += p.completions
        out.logprobs += p.logprobs
        out.rewards += p.rewards
        out.entropy_sum += p.entropy_sum
        out.metrics.merge(p.metrics)
        if out.sampled is not None:
            out.sampled += p.sampled
        if out.reward_parts is not None:
            for k, v in p.reward_parts.items():
                out.reward_parts[k] += v
    return out


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """Fail fast with a clear error if ``host:port`` does not accept connections (ray.init would retry
    for tens of seconds before failing)."""
    if address is None or address == "auto" or "://" in address and not address.startswith("ray://"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BebopError(f"bad Ray address {address!r}; expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BebopError(f"Ray address {address} is unreachable: {e}") from None


class RayBackend:
    """Rollout workers as Ray actors; each step's weights go through the object store once (``ray.put``)
    and every worker samples its share of the step's prompts. ``address=None`` starts a local Ray."""

    def __init__(self, cfg: RLConfig, workers: int = 1, address: str | None = None,
                 num_cpus: int | None = None, data: UserPrompts | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise BebopError("the Ray backend needs the optional extra: pip install 'bebop[ray]'") from None
        check_ray_address(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
            except ConnectionError as e:
                raise BebopError(f"cannot connect to Ray at {address}: {e}") from None
        if cfg.prompts_per_step % workers:
            raise BebopError(f"prompts_per_step {cfg.prompts_per_step} does not split over {workers} Ray workers")
        self.ray = ray
        self.cfg = cfg
        self.retries = cfg.rollout_retries
        self.per = cfg.prompts_per_step // workers
        self.worker_class = ray.remote(num_cpus=1)(RolloutWorker)
        self.data = None if data is None else ray.put(data)    # the user's prompts, shipped once to all actors
        self.actors = [self.worker_class.remote(cfg, self.data) for _ in range(workers)]

    def submit(self, step: int, version: int, policy_state: dict, head_state: dict | None) -> _RayFuture:
        """Push the weights once, then ask every worker for its share of step ``step``'s prompts."""
        return _RayFuture(self, step, version, self.ray.put((policy_state, head_state)))

    def launch(self, i: int, step: int, version: int, weights) -> tuple:
        """Worker ``i``'s shard of step ``step``: (the actor it runs on, its object ref)."""
        actor = self.actors[i]
        return actor, actor.run.remote(step, version, weights, i * self.per, self.per)

    def replace(self, i: int, dead) -> None:
        """A fresh actor in slot ``i`` for the ``dead`` one (unless another step's shard replaced it already)."""
        if self.actors[i] is dead:
            self.ray.kill(dead)
            self.actors[i] = self.worker_class.remote(self.cfg, self.data)

    def close(self) -> None:
        """Stop the worker actors (a Ray started by this process stays up for the next run)."""
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
