"""The continuous-batching engine, the OpenAI protocol models, the chat template and the handlers,
on a tiny random GPT with a character tokenizer: no Ray, seconds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from aidc.data.text import train_tokenizer
from aidc.models.gpt import GPT
from aidc.serving import openai as oa
from aidc.serving.chat import render_chat
from aidc.serving.engine import Engine, QueueFull, SamplingParams
from aidc.serving.engine_process import ProcessEngine
from aidc.serving.lm_server import LMService, ServedLM
from aidc.errors import RequestError

TOK = train_tokenizer(["hello world, the quick brown fox jumps over the lazy dog. ABC:\n"], "char", 0, False)


def _model(block_size=64):
    torch.manual_seed(0)
    return GPT(TOK["vocab_size"], block_size, d_model=32, heads=4, layers=2, dropout=0.0).eval()


def _service(engine=None, **kw) -> LMService:
    return LMService({"tiny": ServedLM("tiny", "1", TOK, engine or Engine(_model(), TOK["eos_id"], **kw))})


@pytest.fixture(scope="module")
def proc_engine():
    """One engine process for the tests that run on both engines (each start is a new Python + torch)."""
    engine = ProcessEngine(_model(block_size=256), eos_id=None, max_seqs=8)
    yield engine
    engine.close(join_s=10)
    assert engine.proc.returncode == 0


@pytest.fixture(params=["thread", "process"])
def make_engine(request, proc_engine):
    """Engine(...) in a thread of this process, or the shared engine process (same model and seed)."""
    def make(**kw):
        return Engine(_model(block_size=256), eos_id=None, max_seqs=8, **kw) if request.param == "thread" \
            else proc_engine
    return make


def run(coro):
    return asyncio.run(coro)


def _ids(text):
    return [TOK["vocab"].index(c) for c in text]


def test_batched_step_matches_the_plain_forward():
    model = _model()
    a, b = torch.tensor([_ids("hello world")]), torch.tensor([_ids("the fox")])
    cache = model.new_cache(4)
    idx = torch.zeros((2, a.shape[1]), dtype=torch.long)
    idx[0], idx[1, :b.shape[1]] = a[0], b[0]
    pos = torch.arange(a.shape[1])[None].expand(2, -1)
    logits = model.step(idx, pos, cache, torch.tensor([2, 0]))
    with torch.no_grad():
        assert torch.allclose(logits[0], model(a)[0], atol=1e-5)
        assert torch.allclose(logits[1, :b.shape[1]], model(b)[0], atol=1e-5)
        nxt = model.step(torch.tensor([[5], [6]]), torch.tensor([[a.shape[1]], [b.shape[1]]]), cache,
                         torch.tensor([2, 0]))
        assert torch.allclose(nxt[1, 0], model(torch.cat([b, torch.tensor([[6]])], 1))[0, -1], atol=1e-5)


def test_kv_cache_generation_equals_recomputation_greedy(make_engine):
    model = _model(block_size=256)
    engine = make_engine()
    prompt = _ids("the quick")

    async def go():
        return [e.token async for e in engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0))]

    tokens = run(go())
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert tokens == seq[len(prompt):]


def test_seeded_sequence_is_the_same_alone_and_in_a_busy_batch(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=30, temperature=1.0, top_k=20, seed=7)

    async def one(prompt, p):
        return [e.token async for e in engine.generate(prompt, p)]

    async def go():
        alone = await one(_ids("hello"), params)
        others = [one(_ids("lazy dog" * (i % 3 + 1)), SamplingParams(max_tokens=5 + 6 * i, seed=i))
                  for i in range(6)]
        busy = await asyncio.gather(*others[:3], one(_ids("hello"), params), *others[3:])
        return alone, busy[3], engine.steps

    alone, busy, steps = run(go())
    assert alone == busy and len(alone) == 30


def test_the_engine_keeps_generating_while_the_event_loop_is_busy(make_engine):
    """Steps do not wait for the consumer's loop (vLLM's engine-core split): a loop stuck in other work for
    a while finds the tokens generated meanwhile waiting in its queue, in order."""
    import time

    engine = make_engine()

    async def go():
        seq = engine.add(_ids("hello"), SamplingParams(max_tokens=200, temperature=0))
        first = await seq.queue.get()  # the engine is running
        steps = engine.steps
        time.sleep(0.3)  # the loop is blocked: nothing on it can schedule a step
        during = engine.steps - steps
        events = [first] + [seq.queue.get_nowait() for _ in range(seq.queue.qsize())]
        while events[-1][1].finish_reason is None:
            events.append(await seq.queue.get())
        return during, [e.index for _, e in events], events[-1][1].finish_reason

    during, indexes, reason = run(go())
    assert during >= 5, during  # tens of steps happened while the loop slept
    assert indexes == list(range(200)) and reason == "length"


def test_requests_join_and_leave_the_running_batch():
    engine = Engine(_model(), eos_id=None, max_seqs=2)
    seen = []

    async def go():
        async def one(n):
            out = []
            async for e in engine.generate(_ids("abc"), SamplingParams(max_tokens=n, seed=1)):
                seen.append(engine.stats()["running"])
                out.append(e.token)
            return out
        return await asyncio.gather(one(5), one(20), one(5))

    outs = run(go())
    assert [len(o) for o in outs] == [5, 20, 5]
    assert max(seen) == 2  # never more than the slots; the third joined when the first left
    assert engine.stats()["running"] == 0 and len(engine.free_slots) == 2


def test_abort_frees_the_slot_and_stops_generation(make_engine):
    engine = make_engine()

    async def go():
        gen = engine.generate(_ids("hello"), SamplingParams(max_tokens=60, seed=0))
        for _ in range(3):
            await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if engine.stats()["recent"] and engine.stats()["recent"][-1]["finish_reason"] == "abort":
                break
        return engine.stats()

    stats = run(go())
    assert stats["running"] == 0 and stats["recent"][-1]["finish_reason"] == "abort"
    assert stats["recent"][-1]["generated"] < 60


def test_queue_full_and_context_errors():
    engine = Engine(_model(block_size=16), eos_id=None, max_waiting=1)
    with pytest.raises(RequestError, match="context is 16 tokens") as e:
        engine.check_length(10, 8)
    assert e.value.status == 400
    engine.check_length(10, 7)  # the last token is never fed back: 17 = block_size + 1 fits

    engine = Engine(_model(block_size=256), eos_id=None, max_seqs=1, max_waiting=1)

    async def go():  # one sequence runs (250 steps), one waits for its slot, a third is one too many
        engine.add(_ids("ab"), SamplingParams(max_tokens=250))
        engine.add(_ids("ab"), SamplingParams(max_tokens=2))
        engine.add(_ids("ab"), SamplingParams(max_tokens=2))

    with pytest.raises(QueueFull) as e:
        run(go())
    assert e.value.status == 429


def test_protocol_models_and_error_body():
    assert oa.CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompt == [[1, 2], [3]]
    assert oa.CompletionRequest(model="m", prompt="hi", repetition_penalty=1.1).prompt == "hi"
    for bad in ({"prompt": "x", "stream_options": {"include_usage": True}}, {"prompt": "x", "temperature": 3},
                {"prompt": "x", "not_a_field": 1}, {"prompt": []}, {"prompt": "x", "stop": list("abcde")}):
        with pytest.raises(ValidationError):
            oa.CompletionRequest(model="m", **bad)
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs"):
        oa.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    body = oa.error_body("nope", 404, "model")
    assert body == {"error": {"message": "nope", "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}


def test_chat_template_default_and_custom():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_chat(msgs, TOK) == "system: Be brief.\nuser: hi\nassistant:"
    custom = {**TOK, "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
              "eos_token": "</s>"}
    assert render_chat(msgs, custom) == "<system>Be brief.<user>hi"


def test_completion_echo_logprobs_match_the_model():
    svc = _service()
    prompt = _ids("hello world")
    req = oa.CompletionRequest(model="tiny", prompt=[prompt], echo=True, logprobs=1, max_tokens=0)
    out = run(svc.completion(req))
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(svc.models["tiny"].engine.model(torch.tensor([prompt]))[0], -1)
    expected = [float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert out.choices[0].text == "hello world" and out.usage.completion_tokens == 0


def test_stream_reassembles_to_the_plain_completion_with_stop_strings(make_engine):
    svc = _service(make_engine())
    base = dict(model="tiny", prompt="the ", max_tokens=40, seed=3, temperature=1.0, n=2, ignore_eos=True)
    plain = run(svc.completion(oa.CompletionRequest(**base)))

    async def stream(**kw):
        agen = await svc.completion(oa.CompletionRequest(**base, stream=True, **kw))
        return [f"{event}\n\n" for event in "".join([x async for x in agen]).split("\n\n") if event]

    lines = run(stream(stream_options={"include_usage": True}))
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == plain.usage.completion_tokens
    for i in range(2):
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i)
        assert text == plain.choices[i].text
    stop = plain.choices[0].text[5:7]
    assert len(stop) == 2
    stopped = run(svc.completion(oa.CompletionRequest(**{**base, "stop": stop})))
    assert stopped.choices[0].text == plain.choices[0].text[:plain.choices[0].text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_service_errors_name_the_problem():
    svc = _service()
    with pytest.raises(RequestError) as e:
        run(svc.completion(oa.CompletionRequest(model="nope", prompt="x")))
    assert e.value.status == 404
    with pytest.raises(RequestError, match="outside this model's vocabulary") as e:
        run(svc.completion(oa.CompletionRequest(model="tiny", prompt=[10_000])))
    assert e.value.status == 400
    with pytest.raises(RequestError, match="context is 64 tokens"):
        run(svc.completion(oa.CompletionRequest(model="tiny", prompt="a" * 60, max_tokens=10)))


@pytest.mark.parametrize("kind", [Engine, ProcessEngine])
def test_request_timeout_ends_a_running_sequence_with_length(kind):
    """(In the engine process too: the replica stamps arrival, the engine compares with one host clock.)"""
    engine = kind(_model(), eos_id=None, timeout_s=1e-9)

    async def go():
        return [e async for e in engine.generate(_ids("hello"), SamplingParams(max_tokens=40, seed=0))]

    try:
        events = run(go())
        assert [e.token is not None for e in events] == [True, False] and events[-1].finish_reason == "length"
        assert engine.stats()["recent"][-1]["finish_reason"] == "timeout" and engine.stats()["running"] == 0
    finally:
        engine.close(join_s=10)


def test_shipped_serve_config_has_a_valid_llm_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_apps.llm import LLMArgs
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    app = next(a for a in cfg["applications"] if a["name"] == "llm")
    assert app["route_prefix"] == "/" and app["import_path"] == "serve_apps.llm:app_builder"
    assert LLMArgs.model_validate(app["args"]).models == ["shakespeare-gpt@champion"]
    deployment = app["deployments"][0]
    assert deployment["max_ongoing_requests"] > app["args"]["max_num_seqs"]  # the engine queues, not Serve
    assert "autoscaling_config" in deployment and "num_gpus" in deployment["ray_actor_options"]


def test_engine_process_queue_full_and_stats():
    engine = ProcessEngine(_model(block_size=256), eos_id=None, max_seqs=1, max_waiting=1)
    try:
        async def go():
            first = engine.add(_ids("ab"), SamplingParams(max_tokens=250))
            await first.queue.get()  # running: it holds the only slot
            engine.add(_ids("ab"), SamplingParams(max_tokens=2))  # waits for the slot
            with pytest.raises(QueueFull) as e:
                engine.add(_ids("ab"), SamplingParams(max_tokens=2))
            assert e.value.status == 429
            events = [await first.queue.get()]
            while events[-1][1].finish_reason is None:
                events.append(await first.queue.get())
            return events[-1][1], engine.stats()

        last, stats = run(go())
        assert stats["engine"] == "process" and stats["pid"] == engine.proc.pid
        assert last.finish_reason == "length" and last.index == 249 and stats["generated_tokens"] >= 250
    finally:
        engine.close(join_s=10)


def test_a_request_the_engine_process_cannot_take_fails_alone(proc_engine):
    """(The protocol bounds `seed`; this sends an unusable one past it.) The batch carries on."""
    async def go():
        async def one(params):
            return [e async for e in proc_engine.generate(_ids("hello"), params)]
        return await asyncio.gather(one(SamplingParams(max_tokens=20, seed=1)), one(SamplingParams(max_tokens=5,
                                                                                                   seed=2**64)))

    good, bad = run(go())
    assert len(good) == 20 and good[-1].finish_reason == "length"
    assert [e.finish_reason for e in bad] == ["error"]
    assert any("Overflow" in r["finish_reason"] for r in proc_engine.stats()["recent"])  # the reason is kept
    with pytest.raises(ValidationError):
        oa.CompletionRequest(model="m", prompt="x", seed=2**63)


def test_engine_process_that_dies_fails_its_requests_with_503_and_the_health_check():
    import signal

    from aidc.errors import AidcError

    engine = ProcessEngine(_model(block_size=256), eos_id=None)
    svc = _service(engine)

    async def go():
        gen = engine.generate(_ids("hello"), SamplingParams(max_tokens=250, seed=0))
        await gen.__anext__()
        engine.proc.send_signal(signal.SIGKILL)
        return [e.finish_reason async for e in gen][-1]

    assert run(go()) == "error"  # in flight: ended, not left hanging
    with pytest.raises(AidcError, match="exited unexpectedly"):
        engine.check_alive()
    with pytest.raises(RequestError, match="being replaced") as e:
        run(svc.completion(oa.CompletionRequest(model="tiny", prompt="hi", max_tokens=2)))
    assert e.value.status == 503
    with pytest.raises(RequestError, match="being replaced") as e:
        svc.health()  # GET /v1/health: 503 too, for load balancers
    assert e.value.status == 503


def test_engine_process_ends_with_its_parent():
    """A replica killed outright (SIGKILL: no atexit, no close) must not leave its engine process behind."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    code = ("import os; from aidc.models.gpt import GPT; from aidc.serving.engine_process import ProcessEngine; "
            "e = ProcessEngine(GPT(40, 64, d_model=32, heads=4, layers=2), eos_id=None); "
            "print(e.proc.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    child = int(out.stdout.split()[-1])

    def running() -> bool:  # a zombie (ended, not yet reaped by init) counts as ended
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    if running():
        os.kill(child, 9)
        pytest.fail(f"engine process {child} outlived its parent by 30 s")
