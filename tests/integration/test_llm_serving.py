"""The OpenAI-compatible `llm` Serve app - vLLM through Ray Serve LLM - on the shared local Ray, driven by the
official `openai` client: a char GPT trained here (registry reference, exported to a Hugging Face folder for
vLLM) in the app `llm`, and a Hugging Face GPT-2 folder made here and imported with `aidc model import` in
the app `llm-hf` beside a tiny Llama imported as it is. One vLLM engine per model, three for the module."""

from __future__ import annotations

import asyncio
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from aidc.cli import main as aidc_main
from aidc.tasks import preprocess
from aidc.registry import tracking_uri
from aidc.testing import free_port, make_tiny_gpt2, make_tiny_llama, serve_shutdown, serve_start
from aidc.train.register import register
from aidc.train.trainer import run_training
from tests.integration.conftest import metrics_text, workload_config
from tests.security_helpers import make_key, requests_send_key

pytestmark = pytest.mark.integration

# num_workers: 0: the loop runs in the driver, no worker group to start. Heads of 32: what vLLM's CPU
# attention takes (aidc.hf.folder.CPU_HEAD_SIZES).
TINY = ["resources.num_workers=0", "train.epochs=1", "model.d_model=64",
        "model.layers=1", "model.heads=2", "train.max_steps_per_epoch=30", "run.name=llm-tiny",
        "registry.alias=serving"]
ENGINE = {"num_cpus": 0.5}  # dtype float32 on CPU by default: the API's perplexity equals the offline one


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def char_gpt(root):
    cfg = workload_config("shakespeare-gpt", root, *TINY)
    dataset, _ = preprocess(cfg)
    outcome = run_training(cfg)
    return register(cfg, outcome), dataset, outcome.metrics


@pytest.fixture(scope="module")
def hf_gpt2(root, tmp_path_factory):
    folder = make_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2", n_positions=4096, n_embd=64, n_head=2)
    rc = aidc_main(["model", "import", str(folder), "--name", "tiny-gpt2", "--alias", "imported",
                    "--storage", root])
    assert rc == 0
    return "tiny-gpt2@imported", folder


@pytest.fixture(scope="module")
def hf_llama(root, tmp_path_factory):
    folder = make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")
    assert aidc_main(["model", "import", str(folder), "--name", "tiny-llama", "--alias", "imported",
                      "--storage", root]) == 0
    return "tiny-llama@imported", folder


@pytest.fixture(scope="module")
def server(root, char_gpt, hf_gpt2, hf_llama):
    from ray import serve

    from serve_apps.llm import app_builder

    port = free_port()
    serve_start(http_options={"host": "127.0.0.1", "port": port})
    uri = tracking_uri(None, root)
    try:
        # both apps at once (run_many waits for both): their three engines start side by side
        serve.run_many([
            serve.RunTarget(app_builder({"models": [char_gpt[0].ref], "tracking_uri": uri, "max_body_bytes": 200_000,
                                         "defaults": {**ENGINE, "max_num_seqs": 16}}), name="llm", route_prefix="/"),
            # a small queue (429 beyond)
            serve.RunTarget(app_builder({"models": [{"ref": hf_gpt2[0], **ENGINE, "max_num_seqs": 2, "max_waiting": 1},
                                                    {"ref": hf_llama[0], **ENGINE}], "tracking_uri": uri,
                                         "scrub": ["email", "phone"]}),
                            name="llm-hf", route_prefix="/hf")])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve_shutdown()


@pytest.fixture(scope="module", autouse=True)
def api_key(ray_session):
    """API keys are on by default: every plain `requests` call here sends this one."""
    with requests_send_key(make_key("infer:*", owner="llm-tests")) as key:
        yield key


@pytest.fixture(scope="module")
def client(server, api_key):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_client(server, api_key):
    return openai.OpenAI(base_url=f"{server}/hf/v1", api_key=api_key, max_retries=0, timeout=120)


MODEL = "shakespeare-gpt"


def test_models_health_and_openapi(server, client, hf_client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert sorted(m.id for m in hf_client.models.list().data) == ["tiny-gpt2", "tiny-llama"]
    card = requests.get(f"{server}/v1/models").json()["data"][0]
    assert card["max_model_len"] == 128 and card["version"] == "1"
    health = requests.get(f"{server}/v1/health").json()
    assert health["status"] == "ok" and health["models"][MODEL]["engine"] == "vllm"
    doc = requests.get(f"{server}/v1/openapi.json").json()
    assert {"/completions", "/chat/completions", "/tokenize", "/detokenize", "/models", "/health"} <= {
        p.removeprefix("/v1") for p in doc["paths"]}
    assert "CompletionRequest" in doc["components"]["schemas"]


def test_completion_plain_and_streamed_are_the_same_text(client):
    kw = dict(model=MODEL, prompt="ROMEO:\n", max_tokens=40, seed=11, temperature=0.9)
    plain = client.completions.create(**kw)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and plain.model == MODEL and choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens == 7 and plain.usage.completion_tokens <= 40  # char tokens, no BOS added
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason


def test_chat_plain_and_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "Speak as a king."},
                                     {"role": "user", "content": "What news?"}],
              max_completion_tokens=30, seed=5)
    plain = client.chat.completions.create(**kw)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == plain.choices[0].finish_reason
    # the chat template travels in the exported tokenizer_config.json (aidc's `role: content` lines)
    tok = requests.post(f"{client.base_url}tokenize", json={"model": MODEL, "messages": kw["messages"]}).json()
    assert plain.usage.prompt_tokens == tok["count"]
    text = requests.post(f"{client.base_url}detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert text["prompt"] == "system: Speak as a king.\nuser: What news?\nassistant:"


def test_n_stop_and_chat_logprobs(client):
    many = client.completions.create(model=MODEL, prompt=["KING:", "QUEEN:"], n=3, max_tokens=12, seed=1)
    assert sorted(c.index for c in many.choices) == list(range(6))
    assert len({c.text for c in many.choices}) > 1  # n samples differ
    greedy = dict(model=MODEL, prompt="KING:", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**greedy)
    stop = free.choices[0].text[3:5]
    assert len(stop) == 2
    cut = client.completions.create(**greedy, stop=[stop])
    assert cut.choices[0].text == free.choices[0].text[:free.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_echo_logprobs_score_like_lm_eval_harness(client):
    """lm-evaluation-harness local-completions: echo, logprobs=1, max_tokens=1, token-id prompts."""
    prompts = [[12, 40, 41, 1 + 2, 50], [20, 21, 22]]
    out = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    for choice, prompt in zip(sorted(out.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
        assert all(x <= 0 for x in lp.token_logprobs[1:]) and lp.top_logprobs[0] is None
        # vLLM lists the top-1 token and the scored one (one entry where they agree)
        assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])


def test_perplexity_through_the_api_equals_offline_test_perplexity(client, char_gpt, root):
    """The test split's windows scored through the API (echo + logprobs) and by aidc's own GPT offline in
    float32: the same perplexity (rel 1e-3). A window is cut to 127 tokens: with the one token the API must
    generate it fills the 128-token context."""
    import torch

    from aidc.tasks.loaded import load_model

    ref, dataset, _ = char_gpt
    windows = [b[:127] for b in dataset.read_numpy("test")["tokens"].tolist()]
    total, count = 0.0, 0
    for i in range(0, len(windows), 64):
        out = client.completions.create(model=MODEL, prompt=windows[i:i + 64], echo=True, logprobs=0, max_tokens=1,
                                        temperature=0)
        for c in out.choices:
            total += sum(c.logprobs.token_logprobs[1:len(windows[0])])
            count += len(windows[0]) - 1
    model = load_model(ref.ref, tracking_uri(None, root)).model.float().eval()
    with torch.no_grad():
        x = torch.tensor(windows)
        logp = torch.log_softmax(model(x[:, :-1]), dim=-1)
        offline = logp.gather(-1, x[:, 1:, None]).sum().item()
    assert count == x[:, 1:].numel()
    assert math.exp(-total / count) == pytest.approx(math.exp(-offline / count), rel=1e-3)


LM_EVAL_TASK = """task: aidc_tiny_perplexity
dataset_path: json
dataset_kwargs:
  data_files: {{test: {docs}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: byte_perplexity
  - metric: word_perplexity
"""


def test_lm_eval_harness_scores_a_served_model_out_of_the_box(server, char_gpt, tmp_path, api_key):
    """The README's lm_eval command, unchanged: `local-completions` with `tokenizer_backend=remote` (vLLM's
    root /tokenizer_info, /tokenize, /detokenize, keys on) on an app serving one model. Its byte perplexity
    equals scoring the same documents directly (each after <eos>, as lm-eval's rolling windows are) - so the
    <eos> it asks the server to tokenize is the real end-of-sequence token, not five characters."""
    import os
    import subprocess
    import sys

    _, dataset, _ = char_gpt
    base = server
    # the root routes: keys and scopes as on /v1; with one model served `model` may be left out
    assert requests.get(f"{base}/tokenizer_info", headers={"Authorization": ""}).status_code == 401
    other = make_key("infer:tiny-gpt2", owner="llm-tests")
    refused = requests.post(f"{base}/tokenize", json={"prompt": "a"}, headers={"Authorization": f"Bearer {other}"})
    assert refused.status_code == 403, refused.text
    info = requests.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["model"] == MODEL and info["model_max_length"] == 128, info
    eos = requests.post(f"{base}/tokenize", json={"prompt": "<eos>", "add_special_tokens": False}).json()
    assert eos["tokens"] == [2]

    text = dataset.read_numpy("test")["tokens"][0].tolist()  # a test window, as text
    detok = requests.post(f"{base}/detokenize", json={"tokens": [t for t in text if t > 2]}).json()["prompt"]
    docs = [detok[i:i + 90] for i in range(0, 270, 90)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(LM_EVAL_TASK.format(docs=tmp_path / "docs.jsonl"))
    max_len = requests.get(f"{base}/v1/models").json()["data"][0]["max_model_len"]
    env = {**os.environ, "OPENAI_API_KEY": api_key, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         f"model={MODEL},base_url={base}/v1/completions,tokenizer_backend=remote,auth_token={api_key},"
         f"max_length={max_len}", "--tasks", "aidc_tiny_perplexity", "--include_path", str(tmp_path),
         "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    got = result["results"]["aidc_tiny_perplexity"]["byte_perplexity,none"]

    c = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=120)
    ids = [requests.post(f"{base}/tokenize", json={"prompt": d}).json()["tokens"] for d in docs]
    scored = c.completions.create(model=MODEL, prompt=[[2] + i for i in ids], echo=True, logprobs=0, max_tokens=1)
    total = sum(sum(ch.logprobs.token_logprobs[1:len(i) + 1]) for ch, i in
                zip(sorted(scored.choices, key=lambda ch: ch.index), ids))
    expected = math.exp(-total / sum(len(d.encode()) for d in docs))
    assert got == pytest.approx(expected, rel=1e-4), (got, expected)


def test_sixteen_concurrent_streams_match_their_seeded_plain_runs(client):
    async def go():
        aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key=client.api_key, max_retries=0, timeout=120)

        async def stream(i):
            chunks = await aclient.completions.create(model=MODEL, prompt="First Citizen:\n" * (1 + i % 3),
                                                      max_tokens=20 + 3 * i, seed=i, stream=True)
            return "".join([c.choices[0].text async for c in chunks if c.choices])

        texts = await asyncio.gather(*(stream(i) for i in range(16)))
        await aclient.close()
        return texts

    texts = asyncio.run(go())
    assert all(texts)
    for i in (0, 7, 15):  # the same seed alone gives the same text as inside the busy batch
        alone = client.completions.create(model=MODEL, prompt="First Citizen:\n" * (1 + i % 3),
                                          max_tokens=20 + 3 * i, seed=i)
        assert texts[i] == alone.choices[0].text


def test_imported_gpt2_is_served_the_same_way(server, hf_client, hf_gpt2):
    from transformers import GPT2LMHeadModel
    import torch

    _, folder = hf_gpt2
    out = hf_client.completions.create(model="tiny-gpt2", prompt="the quick brown", max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    ids = requests.post(f"{server}/hf/v1/tokenize", json={"model": "tiny-gpt2", "prompt": "the quick brown"}).json()
    hf = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    seq = list(ids["tokens"])
    with torch.no_grad():  # greedy decoding with Hugging Face's own implementation of the same weights
        for _ in range(8):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    expected = requests.post(f"{server}/hf/v1/detokenize", json={"model": "tiny-gpt2", "tokens": seq[len(ids["tokens"]):]})
    assert out.choices[0].text == expected.json()["prompt"]
    assert ids["max_model_len"] == 4096


def test_the_scrub_arg_replaces_personal_data_before_the_model_reads_it(server, hf_client):
    """llm-hf runs with scrub: [email, phone]: the echoed prompt is what the model read; /tokenize counts the
    same tokens as generation sees."""
    prompt = "mail ana.li@example.com or call +44 20 7946 0958 today"
    out = hf_client.completions.create(model="tiny-gpt2", prompt=prompt, echo=True, max_tokens=1, temperature=0)
    text = out.choices[0].text
    assert text.startswith("mail <EMAIL> or call <PHONE> today") and "@" not in text, text
    ids = requests.post(f"{server}/hf/v1/tokenize", json={"model": "tiny-gpt2", "prompt": prompt}).json()
    plain = requests.post(f"{server}/hf/v1/tokenize", json={"model": "tiny-gpt2",
                                                            "prompt": "mail <EMAIL> or call <PHONE> today"}).json()
    assert ids["tokens"] == plain["tokens"] and out.usage.prompt_tokens == ids["count"]


def test_a_llama_imported_as_it_is_is_served_by_vllm(server, hf_client, hf_llama, root):
    """Any architecture transformers knows: the folder itself is the registered version (signed, manifest),
    and vLLM's greedy tokens equal Hugging Face's own implementation of the same weights."""
    from transformers import LlamaForCausalLM
    import torch

    from aidc.errors import RegistryError
    from aidc.tasks.loaded import load_model

    _, folder = hf_llama
    out = hf_client.completions.create(model="tiny-llama", prompt="to be or not", max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    ids = requests.post(f"{server}/hf/tokenize", json={"model": "tiny-llama", "prompt": "to be or not"}).json()
    hf = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    seq = list(ids["tokens"])
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.choices[0].text == requests.post(f"{server}/hf/detokenize", json={
        "model": "tiny-llama", "tokens": seq[len(ids["tokens"]):]}).json()["prompt"]
    chat = hf_client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0)
    assert chat.usage.prompt_tokens == len(requests.post(f"{server}/hf/tokenize", json={
        "model": "tiny-llama", "prompt": "<|user|>hi<|assistant|>"}).json()["tokens"])  # its own chat template
    # a two-model app cannot guess the model of a tokenizer route: 400 naming `model`
    _error(requests.post(f"{server}/hf/tokenize", json={"prompt": "a"}), 400, "model")
    with pytest.raises(RegistryError, match="llm app"):  # the other apps take aidc models only, and say so
        load_model("tiny-llama@imported", tracking_uri(None, root))


def test_json_schema_output_parses_and_validates(hf_client):
    """Structured output: decoding constrained by xgrammar, so even a random tiny model's reply validates."""
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"],
              "additionalProperties": False}
    out = hf_client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "hello world"}], max_tokens=60, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    reply = json.loads(out.choices[0].message.content)
    jsonschema.validate(reply, schema)
    obj = hf_client.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=40, seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_prefix_cache_hits_show_in_usage(client):
    """Automatic prefix caching: the second request with the same long prefix reports cached prompt tokens."""
    system = "ALL THE WORLD'S A STAGE, AND ALL THE MEN AND WOMEN MERELY PLAYERS. " * 1
    first = client.completions.create(model=MODEL, prompt=system + "KING:", max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=system + "QUEEN:", max_tokens=2, temperature=0)
    assert (first.usage.prompt_tokens_details.cached_tokens or 0) < 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 32  # at least one 32-token block from the cache


def test_client_disconnect_stops_generation(server):
    url = f"{server}/hf/v1"
    body = {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    resp = requests.post(f"{url}/completions", json=body, stream=True, timeout=60)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    got = [line for line, _ in zip(lines, range(6))]
    assert got[0].startswith(b"data: ")
    assert requests.get(f"{url}/health").json()["models"]["tiny-gpt2"]["running"] == 1
    resp.close()  # the client goes away mid-stream: Serve cancels the call, vLLM aborts the request
    for _ in range(100):
        running = requests.get(f"{url}/health").json()["models"]["tiny-gpt2"]["running"]
        if running == 0:
            break
        time.sleep(0.1)
    assert running == 0


def _error(resp, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    return err


def test_every_error_case_is_an_openai_error_envelope(server, client):
    url = f"{server}/v1/completions"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    assert _error(requests.post(url, json={"model": "nope", "prompt": "x"}), 404, "model")["code"] == "model_not_found"
    _error(requests.post(url, json={"model": MODEL, "prompt": "a" * 120, "max_tokens": 50}), 400)
    _error(requests.post(url, json={"model": MODEL, "prompt": "a", "max_tokens": 500}), 400)
    _error(requests.post(url, json={"model": MODEL, "prompt": "x", "temperature": "hot"}), 400, "temperature")
    _error(requests.post(url, json={"model": MODEL, "prompt": {"a": 1}}), 400)
    _error(requests.post(url, json={"model": MODEL, "prompt": [10 ** 6]}), 400)
    _error(requests.post(url, data=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(requests.post(url, json={"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}), 400)
    _error(requests.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400, "messages")
    too_big = requests.post(url, json={"model": MODEL, "prompt": "x" * 300_000})
    assert _error(too_big, 413)["code"] == "request_too_large"
    # fields other servers take are accepted
    ok = requests.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 2, "repetition_penalty": 1.2,
                               "presence_penalty": 0.5, "user": "u", "min_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_queue_full_is_429_with_retry_after(server):
    url = f"{server}/hf/v1/completions"
    body = {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 2000, "ignore_eos": True}

    def burst():
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: requests.post(url, json=body, timeout=120), range(8)))

    responses = burst()  # two run (max_num_seqs), one waits, the rest find the queue full
    codes = [r.status_code for r in responses]
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    busy = [r for r in responses if r.status_code == 429]
    assert busy[0].headers["retry-after"] == "1"
    assert _error(busy[0], 429)["code"] == "rate_limit_exceeded"


def test_engine_metrics_reach_prometheus(server, client, ray_session):
    """vLLM's own engine metrics (TTFT, inter-token latency, KV cache, prefix cache) and aidc's request
    metrics, through Ray's Prometheus endpoint."""
    client.completions.create(model=MODEL, prompt="KING:", max_tokens=8, seed=0)
    wanted = ["ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_inter_token_latency_seconds_bucket",
              "ray_vllm_kv_cache_usage_perc", "ray_vllm_prefix_cache_queries", "ray_vllm_generation_tokens",
              "ray_aidc_serve_requests_total", "ray_aidc_serve_request_duration_seconds_bucket"]
    for _ in range(60):  # Ray exports on an interval (seconds)
        text = metrics_text(ray_session)
        if all(f"{name}{{" in text or f"{name}_total{{" in text for name in wanted):
            break
        time.sleep(1)
    missing = [n for n in wanted if f"{n}{{" not in text and f"{n}_total{{" not in text]
    assert not missing, (missing, sorted({line.split("{")[0] for line in text.splitlines() if "vllm" in line}))
    served = [line for line in text.splitlines()
              if line.startswith("ray_aidc_serve_requests_total") and f'model="{MODEL}"' in line]
    assert served and float(served[0].rsplit(" ", 1)[1]) >= 1


def test_aidc_chat_streams_a_reply_with_the_openai_client(server, client, capsys):
    key = ["--api-key", client.api_key]
    assert aidc_main(["chat", "What news?", "--url", f"{server}/v1", "--model", MODEL, "--seed", "3", *key]) == 0
    printed = capsys.readouterr().out
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What news?"}],
                                           temperature=0.8, seed=3)
    assert printed == reply.choices[0].message.content + "\n"
    assert aidc_main(["chat", "hi", "--url", f"{server}/v1", "--model", "nope", *key]) == 1
    assert "model_not_found" in capsys.readouterr().err


def test_a_tampered_version_is_refused_before_vllm_sees_it(root, char_gpt, tmp_path):
    """A registered file changed after signing: the deploy fails naming the version; no engine starts."""
    from aidc.errors import AidcError
    from aidc.registry import resolve
    from serve_apps.llm import app_builder

    ref = char_gpt[0].ref
    uri = tracking_uri(None, root)
    mv = resolve(ref, uri)
    weights = next(p for p in _artifact_dir(mv.source).rglob("model.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + b"\0\0\0\0")
        with pytest.raises(AidcError) as err:
            app_builder({"models": [ref], "tracking_uri": uri})
        assert f"{mv.name}/{mv.version}" in str(err.value), err.value
    finally:
        weights.write_bytes(original)


def _artifact_dir(source: str):
    from pathlib import Path
    from urllib.parse import urlparse

    return Path(urlparse(source).path) if source.startswith("file:") else Path(source)


def test_a_dead_engine_process_answers_503_and_serve_replaces_the_replica(server):
    """SIGKILL the vLLM engine process (EngineCore) of `llm-hf`'s replica: the app answers 503 + Retry-After
    (never a 500, never a hang), Serve's health check fails, and Serve replaces the replica; service resumes."""
    import os
    import signal

    import psutil

    url = f"{server}/hf/v1"
    before = requests.get(f"{url}/health", timeout=30).json()["models"]["tiny-gpt2"]
    engines = [p for p in psutil.Process(before["replica_pid"]).children(recursive=True)
               if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
    assert engines, [p.cmdline() for p in psutil.Process(before["replica_pid"]).children(recursive=True)]
    os.kill(engines[0].pid, signal.SIGKILL)
    # generous: Serve's health check notices, the old replica stops, a new one starts its engine; CI once took
    # over 180 s here on a loaded machine (the new replica was loading its weights when the test gave up)
    killed = time.monotonic()
    statuses, refused, deadline = [], None, killed + 420
    while time.monotonic() < deadline:
        r = requests.get(f"{url}/health", timeout=30)
        statuses.append(r.status_code)
        if r.status_code == 503 and refused is None:
            refused = r
        if r.status_code == 200 and r.json()["models"]["tiny-gpt2"]["replica_pid"] != before["replica_pid"]:
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"no new replica within 420 s; answers: {statuses}")
    assert refused is not None, statuses  # the dead engine was reported, not hidden behind a 200
    assert refused.headers.get("Retry-After") and "engine" in refused.json()["error"]["message"]
    assert 500 not in statuses, statuses
    print(f"answers of /hf/v1/health after the kill ({time.monotonic() - killed:.0f} s to a new replica):", statuses)
    out = requests.post(f"{url}/completions", json={"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 3},
                        timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
