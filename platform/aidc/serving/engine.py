"""Continuous (iteration-level) batching for aidc GPT models, testable without Serve.

One engine thread per model: every iteration drops aborted sequences, admits waiting ones into free
cache slots (their prompts prefilled together in one right-padded forward), then advances every
running sequence by one token in one batched decode step. A request joins the batch at the next
iteration and leaves the moment it finishes or its consumer goes away; each sequence owns a slot of
the preallocated key/value cache and its own `torch.Generator`, so a seeded request samples the same
tokens alone or in a busy batch.

The engine thread steps on its own, as vLLM's engine core does: each step's tokens go to the consumers'
asyncio loops in one `call_soon_threadsafe`, and the next step starts at once instead of waiting for a
loop busy with HTTP to schedule it (one step per loop round trip cost about a tenth of each step's wall time
in a Serve replica at 16 concurrent requests). Requests are added and aborted from any asyncio loop.
The llm app runs this same loop in a process of its own (`aidc.serving.engine_process.ProcessEngine`), so
model steps do not share the replica's GIL either; batch jobs and tests use the thread.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from aidc.errors import RequestError

logger = logging.getLogger(__name__)
_ENGINES: weakref.WeakSet = weakref.WeakSet()  # stopped at exit: a thread inside a torch op then aborts the process


@atexit.register
def _close_all() -> None:
    for engine in list(_ENGINES):
        engine.close(join_s=5.0)


class QueueFull(RequestError):
    """The engine's waiting queue is full: answered 429 with Retry-After."""

    def __init__(self, message: str, status: int = 429, field: str | None = None):
        super().__init__(message, status, field)


@dataclass
class SamplingParams:
    """How one sequence is sampled (validated by the protocol layer before it gets here)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo scoring)
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class TokenEvent:
    """One step of a sequence: a sampled token (None when nothing was generated) and, last, the reason."""

    token: int | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # on the first event only: [(logprob | None, top | None), ...]
    index: int = -1  # which generated token this is (0: the first)
    at: float = 0.0  # when it was handed over (time.perf_counter: one clock for all processes of a host)


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop  # where its consumer runs: events are handed over there
    arrived: float = field(default_factory=time.perf_counter)
    admitted_at: float = 0.0
    out: list[int] = field(default_factory=list)
    slot: int = -1
    fed: int = 0  # tokens written to the cache
    last_token_at: float = 0.0
    finish_reason: str | None = None
    aborted: bool = False
    stream: bool = True  # False: events are held back and handed over together when the sequence ends
    pending: list = field(default_factory=list)


class NoMetrics:
    """Engine metrics sink that records nothing (the Serve app passes aidc.serving.lm_metrics.LMMetrics)."""

    def admitted(self, seq: Sequence, now: float) -> None: ...
    def token(self, seq: Sequence, now: float, first: bool) -> None: ...
    def state(self, running: int, waiting: int, kv_used: float) -> None: ...


class EngineFront:
    """The consumers' side that both engines share (this thread's `Engine`, and `ProcessEngine` in
    aidc.serving.engine_process): the length check, the async iterator, and handing a step's events to a
    consumer's loop, where metrics are recorded. Subclasses provide `block_size`, `metrics`, `add`, `abort`."""

    block_size: int
    metrics: NoMetrics
    _state_loop: asyncio.AbstractEventLoop | None  # where state metrics are recorded

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        """A sequence's last token is never fed back, so prompt + max_tokens may reach block_size + 1."""
        if prompt_len < 1:
            raise RequestError("the prompt is empty; send at least one token", status=400, field="prompt")
        if prompt_len + max_tokens > self.block_size + 1:
            raise RequestError(
                f"this model's context is {self.block_size} tokens; the prompt has {prompt_len} and max_tokens "
                f"asks for {max_tokens} more. Shorten the prompt or lower max_tokens to at most "
                f"{max(self.block_size + 1 - prompt_len, 0)}", status=400, field="max_tokens")

    def add(self, prompt: list[int], params: SamplingParams, queue: asyncio.Queue | None = None,
            stream: bool = True) -> Sequence:
        raise NotImplementedError

    def abort(self, seq: Sequence) -> None:
        raise NotImplementedError

    def check_alive(self, error=None) -> None:
        """Raise `error` if the engine can no longer step (its process exited); a thread engine always can."""

    async def generate(self, prompt: list[int], params: SamplingParams):
        """Async iterator of TokenEvents for one sequence; closing or cancelling it aborts the sequence."""
        seq = self.add(prompt, params)
        try:
            while True:
                _, event = await seq.queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.abort(seq)

    def _hand_to_loops(self, by_loop: dict, state: tuple | None) -> None:
        """From the engine's side: one `_deliver` callback per consumer loop ({loop: [admitted, events]});
        the state goes to the loop that records state metrics."""
        for loop, (adm, evs) in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, adm, evs, state if loop is self._state_loop else None)
            except RuntimeError:  # that loop is closed: nobody is left to read these sequences
                for seq, _ in evs:
                    self.abort(seq)
                if loop is self._state_loop:
                    self._state_loop = None

    # -- on the consumers' event loops -------------------------------------------------------
    @staticmethod
    def _emit(seq: Sequence, event: TokenEvent) -> None:
        if not seq.stream and event.finish_reason is None:
            seq.pending.append(event)
            return
        for held in seq.pending:
            seq.queue.put_nowait((seq, held))
        seq.pending.clear()
        seq.queue.put_nowait((seq, event))

    def _deliver(self, admitted: list[Sequence], events: list[tuple[Sequence, TokenEvent]],
                 state: tuple | None) -> None:
        for seq in admitted:
            self.metrics.admitted(seq, seq.admitted_at)
        for seq, event in events:
            if event.token is not None:
                self.metrics.token(seq, event.at, first=event.index == 0)
            seq.last_token_at = event.at
            self._emit(seq, event)
        if state is not None:
            self.metrics.state(*state)


class Engine(EngineFront):
    """Continuous batching over one GPT (`aidc.models.gpt.GPT`: `new_cache` + `step`), stepped by a thread
    of this process."""

    def __init__(self, model, eos_id: int | None, max_seqs: int = 32, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096, metrics=None, timeout_s: float | None = None):
        self.model, self.eos_id, self.timeout_s = model, eos_id, timeout_s
        self.max_seqs, self.max_waiting, self.max_prefill_tokens = max_seqs, max_waiting, max_prefill_tokens
        self.block_size = model.block_size
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_seqs)
        self.free_slots = list(range(max_seqs))[::-1]
        self.waiting: collections.deque[Sequence] = collections.deque()  # the engine thread's own
        self.inbox: collections.deque[Sequence] = collections.deque()  # added from the loops, taken by the thread
        self.running: list[Sequence] = []
        self.metrics = metrics or NoMetrics()
        self.generated_tokens = 0
        self.steps = 0
        self.recent: collections.deque[dict] = collections.deque(maxlen=64)
        self._ids = itertools.count()
        self._work = threading.Event()  # set when there is something new for the engine thread
        self._thread: threading.Thread | None = None
        self._closed = False
        self._state_loop: asyncio.AbstractEventLoop | None = None  # where state metrics are recorded

    # -- public -------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, queue: asyncio.Queue | None = None,
            stream: bool = True) -> Sequence:
        """Queue a sequence; its (sequence, TokenEvent) pairs go to `queue` (its own one by default): each as
        it is sampled, or with `stream=False` all at once when the sequence ends (its consumer then wakes
        once instead of once per token, which leaves the event loop free at high concurrency)."""
        self.check_length(len(prompt), params.max_tokens)
        waiting = len(self.waiting) + len(self.inbox)
        if waiting >= self.max_waiting:
            raise QueueFull(f"the server is busy: {waiting} requests are already waiting; retry shortly")
        loop = asyncio.get_running_loop()
        seq = Sequence(next(self._ids), list(prompt), params, self._generator(params),
                       queue if queue is not None else asyncio.Queue(), loop, stream=stream)
        self._state_loop = loop
        self.inbox.append(seq)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="aidc-llm-engine", daemon=True)
            self._thread.start()
            _ENGINES.add(self)
        self._work.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (its consumer went away); its slot is freed before the next step."""
        if seq.finish_reason is None:
            seq.aborted = True
            self._work.set()

    def close(self, join_s: float | None = None) -> None:
        """Stop the engine thread after its current step (waiting up to `join_s` for it); sequences still
        running get no more tokens."""
        self._closed = True
        self._work.set()
        if join_s is not None and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_s)

    def stats(self) -> dict:
        return {"engine": "thread", "running": len(self.running), "waiting": len(self.waiting) + len(self.inbox),
                "max_seqs": self.max_seqs, "generated_tokens": self.generated_tokens, "steps": self.steps,
                "kv_cache_used": self._kv_used(), "recent": list(self.recent)}

    def _generator(self, params: SamplingParams) -> torch.Generator:
        """The sequence's own random stream: seeded requests sample the same tokens in any batch."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return gen

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            events: list[tuple[Sequence, TokenEvent]] = []
            admitted: list[Sequence] = []
            try:
                self._take_new()
                self._drop_aborted(events)
                if not self.running and not self.waiting:
                    self._hand_over(events, admitted)
                    self._idle()
                    continue
                admitted = self._admit()
                decoding = [s for s in self.running if s not in admitted]
                events.extend(self._compute(admitted, decoding))
                self._finish(events)
            except Exception as exc:  # a bug must not leave every caller hanging
                logger.exception("engine step failed")
                for seq in [*self.running, *self.waiting]:
                    events.append((seq, TokenEvent(None, finish_reason="error")))
                    seq.finish_reason = "error"
                    self._release(seq, repr(exc))
                self.running.clear()
                self.waiting.clear()
            self._hand_over(events, admitted)

    def _take_new(self) -> None:
        while self.inbox:
            self.waiting.append(self.inbox.popleft())

    def _idle(self) -> None:
        self._work.wait()
        self._work.clear()  # the state is looked at again before waiting anew

    def _drop_aborted(self, events: list) -> None:
        if self.timeout_s is not None:  # over the request timeout: end it as if max_tokens were reached
            late = time.perf_counter() - self.timeout_s
            for seq in [s for s in self.running if s.arrived < late and not s.aborted]:
                self.running.remove(seq)
                seq.finish_reason = "length"
                events.append((seq, TokenEvent(None, finish_reason="length")))
                self._release(seq, "timeout")
        for seq in [s for s in self.running if s.aborted]:
            self.running.remove(seq)
            seq.finish_reason = "abort"
            self._release(seq, "abort")
        for seq in [s for s in self.waiting if s.aborted]:
            self.waiting.remove(seq)
            seq.finish_reason = "abort"
            self._release(seq, "abort")

    def _admit(self) -> list[Sequence]:
        admitted, longest = [], 0
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            longest2 = max(longest, len(seq.prompt))
            if admitted and longest2 * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            longest = longest2
            seq.slot = self.free_slots.pop()
            admitted.append(seq)
            self.running.append(seq)
            seq.admitted_at = time.perf_counter()
        return admitted

    def _release(self, seq: Sequence, reason: str) -> None:
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        self.recent.append({"id": seq.id, "finish_reason": reason, "generated": len(seq.out),
                            "prompt_tokens": len(seq.prompt)})

    def _kv_used(self) -> float:
        return sum(s.fed for s in self.running) / (self.max_seqs * self.block_size)

    # -- compute (engine thread) ----------------------------------------------------------
    @torch.inference_mode()
    def _compute(self, admitted: list[Sequence], decoding: list[Sequence]) -> list[tuple[Sequence, TokenEvent]]:
        events = []
        if decoding:
            idx = torch.tensor([[s.out[-1]] for s in decoding], device=self.device)
            pos = torch.tensor([[s.fed] for s in decoding], device=self.device)
            slots = torch.tensor([s.slot for s in decoding], device=self.device)
            logits = self.model.step(idx, pos, self.cache, slots)[:, -1].float()
            for seq in decoding:
                seq.fed += 1
            events.extend(zip(decoding, self._sample_rows(decoding, logits)))
        if admitted:
            events.extend(self._prefill(admitted))
        self.steps += 1
        return events

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[Sequence, TokenEvent]]:
        # With nothing to generate the last prompt token is only scored, never fed.
        feeds = [s.prompt if s.params.max_tokens > 0 else s.prompt[:-1] for s in seqs]
        t = max(1, max(len(f) for f in feeds))
        idx = torch.zeros((len(seqs), t), dtype=torch.long, device=self.device)
        for row, f in enumerate(feeds):
            idx[row, :len(f)] = torch.tensor(f, dtype=torch.long)
        pos = torch.arange(t, device=self.device)[None].expand(len(seqs), t)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        logits = self.model.step(idx, pos, self.cache, slots).float()
        last = torch.stack([logits[row, max(len(f) - 1, 0)] for row, f in enumerate(feeds)])
        sampled = iter(self._sample_rows([s for s in seqs if s.params.max_tokens > 0],
                                         last[[s.params.max_tokens > 0 for s in seqs]]))
        events = []
        for row, (seq, f) in enumerate(zip(seqs, feeds)):
            seq.fed = len(f)
            prompt_lps = None
            if seq.params.prompt_logprobs is not None:
                prompt_lps = [(None, None)] + _scores(logits[row, :len(seq.prompt) - 1], seq.prompt[1:],
                                                      seq.params.prompt_logprobs)
            if seq.params.max_tokens == 0:
                event = TokenEvent(None, finish_reason="length")
            else:
                event = next(sampled)
            event.prompt_logprobs = prompt_lps
            events.append((seq, event))
        return events

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """One token per row, all rows at once. Sampling is Gumbel-max (argmax of logits/T plus Gumbel
        noise), the same distribution as drawing from softmax(logits/T); each row's noise comes from its
        own sequence's generator, so a seeded sequence gets the same tokens alone or in any batch."""
        if not seqs:
            return []
        temps = [s.params.temperature for s in seqs]
        x = logits / torch.tensor([max(t, 1e-6) for t in temps], device=logits.device)[:, None]
        for row, s in enumerate(seqs):
            if temps[row] > 0 and ((s.params.top_k and s.params.top_k < x.shape[-1]) or s.params.top_p < 1.0):
                x[row] = _truncate(x[row], s.params.top_k, s.params.top_p)
        sampling = [row for row, t in enumerate(temps) if t > 0]
        if sampling:
            u = torch.stack([torch.rand(x.shape[-1], generator=seqs[row].generator, device=x.device)
                             for row in sampling])
            x[sampling] += -torch.log(-torch.log(u.clamp_(1e-10, 1.0 - 1e-7)))
        tokens = torch.argmax(torch.where(torch.tensor([t > 0 for t in temps], device=x.device)[:, None],
                                          x, logits), dim=-1).tolist()
        return [self._finish_token(s, logits[row], tokens[row]) for row, s in enumerate(seqs)]

    def _finish_token(self, seq: Sequence, logits: torch.Tensor, token: int) -> TokenEvent:
        p = seq.params
        lp, top = (None, None)
        if p.logprobs is not None:
            (lp, top), = _scores(logits[None], [token], p.logprobs)
        seq.out.append(token)
        reason = None
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(seq.out) >= p.max_tokens:
            reason = "length"
        return TokenEvent(token, lp, top, reason, index=len(seq.out) - 1)

    def _finish(self, events: list[tuple[Sequence, TokenEvent]]) -> None:
        """Sequences that ended this step leave the batch and free their slots (before the next step)."""
        for seq, event in events:
            if event.token is not None:
                self.generated_tokens += 1
            if event.finish_reason is not None:
                seq.finish_reason = event.finish_reason
                if seq in self.running:
                    self.running.remove(seq)
                self._release(seq, event.finish_reason)

    def _hand_over(self, events: list[tuple[Sequence, TokenEvent]], admitted: list[Sequence]) -> None:
        """One callback per consumer loop with this step's events (in order); metrics are recorded there."""
        now = time.perf_counter()
        state = (len(self.running), len(self.waiting), self._kv_used())
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq in admitted:
            by_loop.setdefault(seq.loop, [[], []])[0].append(seq)
        for seq, event in events:
            event.at = now
            by_loop.setdefault(seq.loop, [[], []])[1].append((seq, event))
        if self._state_loop is not None:
            by_loop.setdefault(self._state_loop, [[], []])
        self._hand_to_loops(by_loop, state)


def _truncate(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row of temperature-scaled logits with everything outside top-k / the top-p nucleus at -inf."""
    if top_k and top_k < x.shape[-1]:
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = F.softmax(sorted_x, dim=-1)
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p  # keep the smallest set reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def _scores(logits: torch.Tensor, targets: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the target's log-probability and the `top` most likely (token, logprob) pairs."""
    if not targets:
        return []
    lps = F.log_softmax(logits.float(), dim=-1)
    chosen = lps.gather(-1, torch.tensor(targets, device=lps.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = torch.topk(lps, min(top, lps.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in targets]
    return list(zip(chosen, tops))
