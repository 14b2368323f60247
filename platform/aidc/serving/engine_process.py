"""The continuous-batching engine in its own process, as vLLM V1 splits its engine core from the API server.

In a Serve replica the engine thread of `aidc.serving.engine.Engine` shares one GIL with the replica's
HTTP threads (Serve's ASGI loop, the user-code loop): every torch op gives the GIL up and takes it back, and
at 16 concurrent requests a decode step that takes 1.5-2 ms alone took about 3 ms there (py-spy, stop 18's
note). `ProcessEngine` runs the same `Engine` loop in a child process that owns the model and its key/value
cache; the replica keeps tokenization, HTTP and the per-request state, and talks to the child over a socket:

- replica -> engine: ("add", id, prompt, params, arrived, stream), ("abort", id), ("close",)
- engine -> replica: one ("step", admitted, events, state, steps, generated, released) per step that has
  something to say. A non-streamed sequence's tokens are held in the engine process and sent together with
  its last one, so the replica wakes once per such request, not once per token.

`ProcessEngine` has `Engine`'s interface (`add`, `abort`, `generate`, `check_length`, `stats`, `close`), so
`aidc.serving.lm_server` serves either. The child ends when the replica closes it, or when the replica's end
of the socket closes (the replica died), so no engine outlives its replica. If the child dies, every
sequence in flight ends with finish_reason "error", new requests get 503 and `check_alive` raises, which is
what the llm app's Serve health check calls: Serve then replaces the replica.

    python -m aidc.serving.engine_process FD   # started by ProcessEngine, never by hand
"""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch

from aidc.errors import AidcError, RequestError
from aidc.serving.engine import _ENGINES, Engine, EngineFront, NoMetrics, QueueFull, SamplingParams, Sequence, TokenEvent

logger = logging.getLogger(__name__)
STATE_EVERY_S = 0.25  # with nothing else to say, the engine still reports its state this often while busy


class ProcessEngine(EngineFront):
    """`Engine` stepped in a child process; this object is the replica's side of it."""

    def __init__(self, model, eos_id: int | None, max_seqs: int = 32, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096, metrics=None, timeout_s: float | None = None,
                 threads: int | None = None, start_timeout_s: float = 300.0):
        self.block_size = model.block_size
        self.max_seqs, self.max_waiting = max_seqs, max_waiting
        self.metrics = metrics or NoMetrics()
        self.seqs: dict[int, Sequence] = {}  # in flight: sent to the engine and not yet released by it
        self.unadmitted: set[int] = set()  # sent and not yet given a slot (the waiting queue's length)
        self.state: tuple = (0, 0, 0.0)  # running, waiting, kv_cache_used as the engine last reported
        self.steps = self.generated_tokens = 0
        self.recent: collections.deque[dict] = collections.deque(maxlen=64)
        self.exit_reason: str | None = None
        self._ids = itertools.count()
        self._closing = False
        self._state_loop: asyncio.AbstractEventLoop | None = None
        self._ending = False  # set by the reader thread first thing once the engine process is gone
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # to the engine process, sent by the writer thread

        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "aidc.serving.engine_process", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        kwargs = {"max_seqs": max_seqs, "max_waiting": max_waiting, "max_prefill_tokens": max_prefill_tokens,
                  "timeout_s": timeout_s}
        try:
            blob = io.BytesIO()
            torch.save(model, blob)  # the module itself (its class is importable there): no second registry read
            self._conn.send(("start", eos_id, kwargs, threads or torch.get_num_threads()))
            self._conn.send_bytes(blob.getbuffer())
            del blob
            if not self._conn.poll(start_timeout_s):
                raise AidcError(f"the language-model engine process did not start within {start_timeout_s:.0f} s")
            reply = self._conn.recv()
            if reply[0] != "ready":
                raise AidcError(f"the language-model engine process could not start: {reply[1]}")
        except BaseException as exc:
            self.proc.kill()
            self.proc.wait()
            self._conn.close()
            if isinstance(exc, (EOFError, OSError)):
                raise AidcError("the language-model engine process exited before it was ready (exit code "
                                f"{self.proc.returncode}); its error is in this replica's log") from None
            raise
        self._reader = threading.Thread(target=self._read, name="aidc-llm-engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="aidc-llm-engine-writer", daemon=True)
        self._reader.start()
        self._writer.start()
        _ENGINES.add(self)

    # -- public (any thread with a running asyncio loop) ------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, queue: asyncio.Queue | None = None,
            stream: bool = True) -> Sequence:
        """As `Engine.add`: the sequence's events go to `queue`, streamed or all at once at its end."""
        self.check_length(len(prompt), params.max_tokens)
        self.check_alive(RequestError)
        if len(self.unadmitted) >= self.max_waiting:
            raise QueueFull(f"the server is busy: {len(self.unadmitted)} requests are already waiting; "
                            "retry shortly")
        loop = asyncio.get_running_loop()
        seq = Sequence(next(self._ids), list(prompt), params, None, queue if queue is not None else asyncio.Queue(),
                       loop, stream=stream)
        self._state_loop = loop
        self.seqs[seq.id] = seq
        self.unadmitted.add(seq.id)
        if self._ending:  # the reader thread may already have failed what was in flight: this one is not
            self.seqs.pop(seq.id, None)
            self.unadmitted.discard(seq.id)
            raise RequestError("the language-model engine process has exited; this replica is being replaced, "
                               "retry shortly", status=503)
        self._outbox.put(("add", seq.id, seq.prompt, params, seq.arrived, stream))
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence (its consumer went away); the engine frees its slot before its next step."""
        if seq.finish_reason is None and not seq.aborted:
            seq.aborted = True
            self._outbox.put(("abort", seq.id))

    def check_alive(self, error=AidcError) -> None:
        """Raise (`error`: AidcError for health checks, RequestError -> 503 for requests) if the engine
        process has exited."""
        if self.exit_reason is not None:
            if error is RequestError:
                raise RequestError(f"{self.exit_reason}; this replica is being replaced, retry shortly", status=503)
            raise error(self.exit_reason)

    def close(self, join_s: float | None = None) -> None:
        """Ask the engine process to stop after its current step; kill it if it has not within `join_s`."""
        self._closing = True
        self._outbox.put(("close",))
        try:
            self.proc.wait(join_s if join_s is not None else 10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> dict:
        running, _, kv = self.state
        return {"engine": "process", "pid": self.proc.pid, "running": running, "waiting": len(self.unadmitted),
                "max_seqs": self.max_seqs, "generated_tokens": self.generated_tokens, "steps": self.steps,
                "kv_cache_used": kv, "recent": list(self.recent)}

    # -- the replica's writer and reader threads ---------------------------------------------------
    def _write(self) -> None:
        """Sends for every loop, so no event loop ever blocks on the socket while the engine is mid-step."""
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._conn.send(msg)
            except (OSError, ValueError):  # the engine process is gone: the reader thread ends what is in flight
                return

    def _read(self) -> None:
        try:
            while True:
                self._on_step(self._conn.recv())
        except (EOFError, OSError):
            pass
        except Exception:  # a bug here must not leave callers hanging: treat it as the engine's end
            logger.exception("reading the engine process failed")
        self._ended()

    def _on_step(self, msg: tuple) -> None:
        _, admitted, rows, state, self.steps, self.generated_tokens, released = msg
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sid, at in admitted:
            self.unadmitted.discard(sid)
            seq = self.seqs.get(sid)
            if seq is not None:
                seq.admitted_at = at
                by_loop.setdefault(seq.loop, [[], []])[0].append(seq)
        for sid, token, logprob, top, reason, prompt_lps, index, at in rows:
            seq = self.seqs.get(sid)
            if seq is None:
                continue
            if reason is not None:
                seq.finish_reason = reason
            by_loop.setdefault(seq.loop, [[], []])[1].append(
                (seq, TokenEvent(token, logprob, top, reason, prompt_lps, index, at)))
        for sid, reason, generated, prompt_tokens in released:
            self.unadmitted.discard(sid)
            self.seqs.pop(sid, None)
            self.recent.append({"id": sid, "finish_reason": reason, "generated": generated,
                                "prompt_tokens": prompt_tokens})
        changed, self.state = state != self.state, state  # after `recent`: stats never show one without the other
        if changed and self._state_loop is not None:
            by_loop.setdefault(self._state_loop, [[], []])
        self._hand_to_loops(by_loop, state)

    def _ended(self) -> None:
        """The engine process is gone: every sequence in flight ends with finish_reason "error"."""
        self._ending = True  # before the snapshot below: an add() after it sees this and answers 503 itself
        self._outbox.put(None)
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._conn.close()
        self.exit_reason = ("the language-model engine process was closed" if self._closing else
                            f"the language-model engine process exited unexpectedly (exit code {code})")
        if not self._closing:
            logger.error(self.exit_reason)
        by_loop: dict = {}
        now = time.perf_counter()
        for seq in list(self.seqs.values()):
            seq.finish_reason = "error"
            by_loop.setdefault(seq.loop, [[], []])[1].append((seq, TokenEvent(None, finish_reason="error", at=now)))
            self.recent.append({"id": seq.id, "finish_reason": "error", "generated": 0,
                                "prompt_tokens": len(seq.prompt)})
        self.seqs.clear()
        self.unadmitted.clear()
        self.state = (0, 0, 0.0)
        self._hand_to_loops(by_loop, None)


class _ChildEngine(Engine):
    """`Engine`'s loop in the engine process: new work comes from the socket, events go back over it."""

    def __init__(self, conn: Connection, model, eos_id: int | None, **kwargs):
        super().__init__(model, eos_id, **kwargs)
        self.conn = conn
        self.by_id: dict[int, Sequence] = {}
        self.released: list[tuple] = []
        self.bad: list[tuple[int, str]] = []  # requests that could not be added: (id, why)
        self.sent_at, self.sent_state = 0.0, None

    def _take_new(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                try:
                    self._on(msg)
                except Exception as exc:  # one bad request fails alone, not the batch (and never hangs)
                    logger.exception("engine process: bad message %s", msg[:2])
                    self.bad.append((msg[1], repr(exc)))
        except (EOFError, OSError):  # the replica is gone: stop
            self._closed = True

    def _idle(self) -> None:
        try:
            if not self._closed:
                self.conn.poll(None)  # a message, or the replica's end closing
        except (EOFError, OSError):
            self._closed = True

    def _on(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, sid, prompt, params, arrived, stream = msg
            seq = Sequence(sid, prompt, params, self._generator(params), None, None, arrived=arrived, stream=stream)
            self.by_id[sid] = seq
            self.waiting.append(seq)
        elif msg[0] == "abort":
            seq = self.by_id.get(msg[1])
            if seq is not None:
                seq.aborted = True
        elif msg[0] == "close":
            self._closed = True

    def _release(self, seq: Sequence, reason: str) -> None:
        super()._release(seq, reason)
        self.by_id.pop(seq.id, None)
        self.released.append((seq.id, reason, len(seq.out), len(seq.prompt)))

    def _hand_over(self, events: list[tuple[Sequence, TokenEvent]], admitted: list[Sequence]) -> None:
        now = time.perf_counter()
        rows = []
        for sid, why in self.bad:
            rows.append((sid, None, None, None, "error", None, -1, now))
            self.released.append((sid, why, 0, 0))
        self.bad.clear()
        for seq, e in events:
            row = (seq.id, e.token, e.logprob, e.top, e.finish_reason, e.prompt_logprobs, e.index, now)
            if not seq.stream and e.finish_reason is None:
                seq.pending.append(row)  # sent with the sequence's last token
                continue
            rows.extend(seq.pending)
            seq.pending.clear()
            rows.append(row)
        state = (len(self.running), len(self.waiting), self._kv_used())
        if not (rows or admitted or self.released or state[:2] != (self.sent_state or (0, 0))[:2]
                or now - self.sent_at > STATE_EVERY_S):
            return
        try:
            self.conn.send(("step", [(s.id, s.admitted_at) for s in admitted], rows, state, self.steps,
                            self.generated_tokens, self.released))
        except (OSError, ValueError):
            self._closed = True
        self.released, self.sent_at, self.sent_state = [], now, state


def main(argv: list[str] | None = None) -> int:
    conn = Connection(int((argv or sys.argv[1:])[0]))
    try:
        _, eos_id, kwargs, threads = conn.recv()
        torch.set_num_threads(threads)
        model = torch.load(io.BytesIO(conn.recv_bytes()), weights_only=False).eval()
        engine = _ChildEngine(conn, model, eos_id, **kwargs)
    except (EOFError, OSError):
        return 0
    except Exception:
        conn.send(("failed", traceback.format_exc(limit=6)))
        return 1
    conn.send(("ready", engine.block_size))
    engine._run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
