"""Fine-tuning open-weights causal LMs on Ray Train (task causal_lm, jobs/configs/chat-sft.yaml): a tiny random
Llama folder made here learns the synthetic letter-reversal task (exact match from 0 to most of the held-out
rows); without the answer-only loss mask it learns it worse; a LoRA adapter trained with FSDP on 2 workers is
registered in PEFT's format naming its base, and the llm app serves it on vLLM answering as PEFT does offline;
a GPT that aidc holds in its own format is a base too. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aidc.config import load_config
from aidc.tasks import preprocess
from aidc.registry import fetch, tracking_uri
from aidc.train.register import register
from aidc.testing import make_tiny_gpt2, make_tiny_llama, serve_shutdown, serve_start
from aidc.train.trainer import run_training
from tests.conftest import CONFIGS, free_port
from tests.security_helpers import make_key

pytestmark = pytest.mark.integration

# 8 epochs of 1600 rows on 2 workers: about 20 s of training here
LEARN = ["train.epochs=8", "train.lr=0.003", "data.chat.examples=2000", "data.chat.eval_examples=48"]


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


def finetune(root, init_from, name, *overrides):
    cfg = load_config(CONFIGS / "chat-sft.yaml", [f"run.storage={root}", f"model.init_from={init_from}",
                                                  f"registry.model_name={name}", f"run.name={name}", *overrides])
    preprocess(cfg)
    outcome = run_training(cfg)
    return cfg, outcome, register(cfg, outcome)


def _download(ref: str, uri: str, into: Path) -> Path:
    """A registered version's verified files, in a folder of the test's own (a bare fetch() leaves one in /tmp)."""
    into.mkdir()
    return fetch(ref, uri, dst=str(into))[1]


@pytest.fixture(scope="module")
def full(root, llama):
    return finetune(root, llama, "chat-full", *LEARN)


def test_full_finetune_learns_the_held_out_task(full, root, tmp_path):
    cfg, outcome, version = full
    m = outcome.metrics
    assert m["base_test_exact_match"] <= 0.05  # a random model does not reverse letters
    assert m["test_exact_match"] >= 0.6, m
    assert m["test_loss"] < m["base_test_loss"] / 3
    files = _download(version.ref, tracking_uri(None, root), tmp_path / "full")
    spec = json.loads((files / "model.json").read_text())
    assert spec["format"] == "huggingface" and spec["model"]["model_type"] == "llama"
    assert spec["source"]["base"] == {"path": str(cfg.model.init_from)} and spec["metrics"]["test_exact_match"] == m[
        "test_exact_match"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in files.iterdir()}


def test_without_the_loss_mask_it_learns_the_task_worse(full, root, llama):
    _, masked, _ = full
    _, unmasked, _ = finetune(root, llama, "chat-unmasked", *LEARN, "data.chat.mask_prompt=false")
    # the same steps spent also predicting random prompt letters: fewer right answers
    assert unmasked.metrics["test_exact_match"] < masked.metrics["test_exact_match"] - 0.2, (
        unmasked.metrics, masked.metrics)


def _peft_answer(base_folder, adapter_files, prompt: str, max_tokens: int):
    """PEFT's greedy answer (text, token logprobs) to `prompt`: base + adapter, offline."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(adapter_files))
    offline = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_folder)),
                                        str(adapter_files)).eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = offline.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)
    new = out.sequences[0, ids.shape[1]:]
    return (tok.decode(new, skip_special_tokens=True),
            [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, new)])


def test_lora_adapters_trained_with_fsdp_are_served_together_on_one_base_like_peft(full, root, tmp_path):
    """LoRA on the fully fine-tuned version (a registry reference as the base), FSDP over 2 workers, saved as
    adapters in PEFT's format; the llm app serves both on one vLLM engine of their base (multi-LoRA: the request's
    model picks the adapter), each with PEFT's greedy answer and logprobs."""
    from openai import OpenAI
    from ray import serve
    from transformers import AutoTokenizer

    from aidc.hf.folder import materialize
    from serve_apps.llm import app_builder

    base_ref = f"{full[2].name}/{full[2].version}"
    cfg, outcome, lora_a = finetune(root, base_ref, "chat-lora", "train.epochs=2", "train.method=lora",
                                    "train.parallelism=fsdp", "model.lora.save=adapter", "train.lr=0.001")
    _, _, lora_b = finetune(root, base_ref, "chat-lora-b", "train.epochs=1", "train.max_steps_per_epoch=5",
                            "train.method=lora", "model.lora.save=adapter", "train.lr=0.01", "model.lora.rank=4",
                            "resources.num_workers=1")
    assert outcome.metrics["world_size"] == 2
    uri = tracking_uri(None, root)
    files = _download(lora_a.ref, uri, tmp_path / "a")
    names = {p.name for p in files.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    spec = json.loads((files / "model.json").read_text())
    assert spec["format"] == "peft-lora" and spec["base"]["ref"] == base_ref
    assert json.loads((files / "adapter_config.json").read_text())["base_model_name_or_path"] == base_ref

    base = materialize(base_ref, uri)
    messages = [{"role": "user", "content": "reverse: a c e g"}]
    prompt = AutoTokenizer.from_pretrained(str(files)).apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    adapters = {lora_a.name: files, lora_b.name: _download(lora_b.ref, uri, tmp_path / "b")}
    want = {name: _peft_answer(base.folder, adapter, prompt, 12) for name, adapter in adapters.items()}
    assert want["chat-lora"][1] != want["chat-lora-b"][1]  # two different adapters

    port = free_port()
    serve_start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"models": [{"ref": v.ref, "max_model_len": 64, "num_cpus": 0.5} for v in (
            lora_a, lora_b)], "tracking_uri": uri}), name="llm-ft", route_prefix="/ft")
        deployments = serve.status().applications["llm-ft"].deployments
        assert [d for d in deployments if d.startswith("AidcLLMServer")] == [
            f"AidcLLMServer:{full[2].name}"]  # one base engine, no copy per adapter
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/ft/v1", api_key=make_key("infer:*", owner="ft-tests"),
                        max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {full[2].name, "chat-lora", "chat-lora-b"}
        for name, (text, logprobs) in want.items():
            r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
            assert r.model == name and r.choices[0].text == text  # the same greedy answer, token for token
            assert r.choices[0].logprobs.token_logprobs[:len(logprobs)] == pytest.approx(logprobs, abs=1e-3)
        chat = client.chat.completions.create(model="chat-lora", messages=messages, max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == want["chat-lora"][0]  # the chat template it trained with
    finally:
        serve_shutdown()


def test_a_gpt_in_aidcs_own_format_is_a_base(root, tmp_path):
    """An aidc GPT (here a GPT-2 folder imported onto aidc's GPT) is exported as GPT-2 and fine-tuned."""
    from aidc.hf import import_hf_model

    imported = import_hf_model(make_tiny_gpt2(tmp_path / "gpt2", n_positions=64, n_embd=64, n_head=2), "aidc-gpt",
                               root=root)
    _, outcome, version = finetune(root, imported.ref, "chat-gpt", "train.epochs=1", "train.max_steps_per_epoch=10",
                                   "data.chat.examples=200", "data.chat.eval_examples=4", "data.chat.max_length=48")
    assert outcome.metrics["test_loss"] < outcome.metrics["base_test_loss"]
    files = _download(version.ref, tracking_uri(None, root), tmp_path / "chat-gpt")
    spec = json.loads((files / "model.json").read_text())
    assert spec["model"]["model_type"] == "gpt2" and spec["source"]["base"]["ref"] == f"aidc-gpt/{imported.version}"


def test_lora_fsdp_checkpoints_are_sharded_and_resume_after_a_kill_and_onto_one_worker(root, llama, tmp_path,
                                                                                      monkeypatch):
    """FSDP checkpoints are written by every rank (torch.distributed.checkpoint shards, nothing gathered; the
    adapters and their optimizer state only). A worker killed mid-epoch: the group restarts from the last
    checkpoint and ends as an uninterrupted run does. A stopped run continues on 1 worker from 2 workers' shards."""
    from pathlib import Path

    from aidc.train.checkpoint import SHARDS, load

    def run(name, *more):
        cfg = load_config(CONFIGS / "chat-sft.yaml", [
            f"run.storage={root}", f"model.init_from={llama}", f"run.name={name}", "train.method=lora",
            "train.parallelism=fsdp", "train.epochs=2", "train.max_steps_per_epoch=10",
            "train.checkpoint_every_steps=5", "run.max_failures=1", "data.chat.examples=2000",
            "model.lora.dropout=0.0", *more])  # no dropout: the same steps give the same weights on every rank
        preprocess(cfg)
        return run_training(cfg)

    whole = run("chat-whole")
    ckpts = sorted(p for p in Path(root, "runs", "chat-whole").glob("checkpoint_*") if (p / SHARDS).is_dir())
    assert ckpts, "no sharded checkpoint"
    assert {f.name for f in (ckpts[0] / SHARDS).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # per rank
    assert "model" not in load(ckpts[0]) and load(ckpts[0])["sharded"]  # no gathered weights beside the shards

    marker = tmp_path / "kill"
    marker.touch()
    monkeypatch.setenv("AIDC_FAULT_MARKER", f"{marker}:13")
    out = run("chat-kill")
    assert not marker.exists()  # the fault fired
    assert [h["step"] for h in out.history] == [10, 20]  # no step lost, none repeated from scratch
    assert out.resumes and out.resumes[0]["step"] == 10 and out.resumes[0]["world_size"] == 2
    for key in ("val_loss", "test_loss"):  # as if nothing had happened (float sums in another order: 1e-4)
        assert out.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-4), key

    marker.touch()
    with pytest.raises(Exception):
        run("chat-2to1", "run.max_failures=0")
    monkeypatch.delenv("AIDC_FAULT_MARKER")
    one = run("chat-2to1", "resources.num_workers=1")
    assert one.resumes[0]["from_world_size"] == 2 and one.resumes[0]["world_size"] == 1
    assert one.resumes[0]["step"] == 10 and [h["step"] for h in one.history] == [10, 20]
    assert one.metrics["val_loss"] == pytest.approx(whole.metrics["val_loss"], rel=0.05)  # other batches, same run


def test_personal_data_in_chat_rows_is_scrubbed_in_prompts_replies_and_rejected_rows(root, llama, tmp_path):
    """data.privacy.scrub on fine-tuning data: the strings inside each JSON chat row are scrubbed (the row stays
    valid JSON with its roles); the held-out prompts and references hold placeholders, never the values; a
    line that is not JSON is kept among the rejected rows scrubbed as text."""
    import pyarrow.parquet as pq

    mails = [f"user{i}@example.com" for i in range(40)]
    words = [f"{a} {b}" for a in "abcdefgh" for b in "abcde"]  # rows that stay distinct once scrubbed
    rows = [{"messages": [{"role": "user", "content": f"reverse: {w}, then mail {m}"},
                          {"role": "assistant", "content": f"{w[::-1]}, card 4111 1111 1111 1111 to {m}"}]}
            for w, m in zip(words, mails)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in rows] + ["{not json, write to leak@example.com"]) + "\n")
    cfg = load_config(CONFIGS / "chat-sft.yaml", [
        f"run.storage={root}", f"model.init_from={llama}", "name=private-chats", "data.source=files",
        f"data.path={path}", "data.format=jsonl", "data.privacy.scrub=[email, credit_card]",
        "data.split.train=0.5", "data.split.val=0.25", "data.split.test=0.25", "data.chat.max_length=160"])
    dv, _ = preprocess(cfg)
    assert dv.manifest()["counts"]["personal_data_scrubbed"] == {"email": 81, "credit_card": 40}
    held_out = [t for s in ("val", "test") for c in ("prompt", "reference")
                for t in pq.read_table(dv.path(s)).column(c).to_pylist()]
    assert held_out and all("@" not in t and "4111" not in t for t in held_out)
    assert any("<EMAIL>" in t for t in held_out) and any("<CREDIT_CARD>" in t for t in held_out)
    rejected = pq.read_table(dv.path("rejected")).to_pylist()
    assert [r["record"] for r in rejected] == ["{not json, write to <EMAIL>"]


def test_your_own_chat_jsonl_is_preprocessed_with_every_bad_row_kept_with_its_reason(root, llama, tmp_path):
    import pyarrow.parquet as pq

    good = [{"messages": [{"role": "user", "content": f"reverse: {a} b"}, {"role": "assistant", "content": f"b {a}"}]}
            for a in "acdefghijklmnopq"] + [{"prompt": "2+2=", "completion": "4"}, {"text": "to be or not to be"}]
    bad = ["{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
           json.dumps({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
           json.dumps({"prompt": "reverse: " + "a " * 40, "completion": "a " * 40})]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in good] + bad) + "\n")
    cfg = load_config(CONFIGS / "chat-sft.yaml", [
        f"run.storage={root}", f"model.init_from={llama}", "name=own-chats", "data.source=files",
        f"data.path={path}", "data.format=jsonl", "data.chat.max_length=40", "data.clean.dedup=false"])
    dv, _ = preprocess(cfg)
    counts = dv.manifest()["counts"]
    assert counts["read"] == len(good) + len(bad) and counts["kept"] == len(good)
    reasons = counts["rejected_by_reason"]
    assert sum(reasons.values()) == len(bad)
    assert any(r.startswith("not JSON") for r in reasons) and "no assistant turn to learn from" in reasons
    assert any(r.startswith("messages[0]: role 'bot'") for r in reasons)
    assert any(r.startswith("over data.chat.max_length (") for r in reasons)
    kept_rows = pq.read_table(dv.path("rejected")).column("reject_reason").to_pylist()
    assert sorted(kept_rows) == sorted(r for r, n in reasons.items() for _ in range(n))  # each kept, with its reason
