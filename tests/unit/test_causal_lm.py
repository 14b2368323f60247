"""Fine-tuning a pretrained causal LM (task causal_lm): rows and their rejects, the answer-only loss mask, LoRA,
config errors. Tiny Hugging Face folders made here; nothing downloaded, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aidc.config import validate
from aidc.errors import ConfigError
from aidc.tasks import get_task
from aidc.tasks.causal_lm import IGNORE, encode_row, load_tokenizer, parse_record
from aidc.train.parallel import full_state, load_trained
from aidc.testing import make_tiny_gpt2, make_tiny_llama

TASK = get_task("causal_lm")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"gpt2": make_tiny_gpt2(root / "gpt2", n_positions=64, n_embd=64, n_head=2),
            "llama": make_tiny_llama(root / "llama", max_positions=64)}


def job(folder, **over) -> "object":
    raw = {"name": "t", "task": "causal_lm",
           "data": {"source": "synthetic-instructions", "chat": {"max_length": 48, "examples": 40}},
           "model": {"arch": "hf", "init_from": str(folder)}, "train": {"method": "full"},
           "registry": {"model_name": "t"}}
    for path, value in over.items():
        node = raw
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(raw)


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: a b"},
                     {"role": "assistant", "content": "b a"}]}


@pytest.mark.parametrize("line, reason", [
    ("nope", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn to learn from"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "messages[0]: role 'bot' is not one of"),
    (json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}),
     "messages[0]: content must be a non-empty string"),
    (json.dumps({"messages": []}), "messages must be a non-empty list"),
    (json.dumps({"prompt": "2+2=", "completion": ""}), "prompt and completion must both be non-empty"),
    (json.dumps({"text": ""}), "empty text"),
    (json.dumps({"question": "x"}), "no messages, prompt/completion or text field"),
])
def test_bad_rows_have_reasons(line, reason):
    row, why = parse_record(line)
    assert row is None and why.startswith(reason)


def test_rows_of_each_format_parse():
    for row in (CHAT, {"prompt": "2+2=", "completion": "4"}, {"text": "to be or not"}):
        assert parse_record(json.dumps(row)) == (row, "")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loss_covers_the_answer_only(folders, arch):
    tok = load_tokenizer(str(folders[arch]))
    ids, labels = encode_row(CHAT, tok, mask_prompt=True)
    assert len(ids) == len(labels)
    target = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(target[:-1]).strip() == "b a" and target[-1] == tok.eos_token_id  # the answer, then the end
    prompt = [i for i, lab in zip(ids, labels) if lab == IGNORE]
    assert "reverse: a b" in tok.decode(prompt) and "be brief" in tok.decode(prompt)
    _, unmasked = encode_row(CHAT, tok, mask_prompt=False)
    assert unmasked == ids  # mask_prompt: false trains on every token
    ids, labels = encode_row({"prompt": "2+2=", "completion": "4"}, tok, mask_prompt=True)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "4" + tok.eos_token
    ids, labels = encode_row({"text": "to be"}, tok, mask_prompt=True)
    assert labels == ids  # continued pretraining: every token is a target


def test_masked_positions_carry_no_gradient(folders):
    cfg = job(folders["llama"])
    table = {"id": np.arange(2), "record": np.array([json.dumps(CHAT), json.dumps(
        {"prompt": "reverse: c d e", "completion": "e d c"})], dtype=object)}
    state = TASK.fit(table, cfg, {})
    batch = {k: torch.from_numpy(v) for k, v in TASK.transform_batch(TASK.encode_batch(table, state), state).items()}
    model = TASK.build_model(cfg.model.model_dump(mode="json"), TASK.features({}, state))
    logits = TASK.forward(model, batch).detach().requires_grad_(True)
    TASK.loss(logits, batch).backward()
    per_position = logits.grad.abs().sum(dim=-1)
    y = batch["y"][:, :logits.shape[1]]
    assert torch.all(per_position[y == IGNORE] == 0)
    assert torch.all(per_position[y != IGNORE] > 0)
    assert (y != IGNORE).sum() < (batch["mask"] == 1).sum() / 2  # most tokens are prompt, not target


def _lora_model(folder, **over):
    cfg = job(folder, **{"train.method": "lora", "model.lora.rank": 4, **over})
    table = {"id": np.arange(1), "record": np.array([json.dumps(CHAT)], dtype=object)}
    state = TASK.fit(table, cfg, {})
    jd = cfg.model_dump(mode="json")
    model = TASK.adapt(TASK.build_model(jd["model"], TASK.features({}, state)), jd)
    batch = {k: torch.from_numpy(v) for k, v in TASK.transform_batch(TASK.encode_batch(table, state), state).items()}
    return cfg, state, model, batch


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_trains_only_the_adapters(folders, arch):
    _, _, model, batch = _lora_model(folders[arch])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        TASK.loss(TASK.forward(model, batch), batch).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained  # every adapter moved (B from zero); no frozen base weight did
    model_sd, _ = full_state(model, opt, "ddp")
    assert set(model_sd) == trained  # a LoRA checkpoint holds the adapters, not a copy of the base
    _, _, fresh, _ = _lora_model(folders[arch])
    load_trained(fresh, model_sd)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())
    with pytest.raises(RuntimeError, match="missing"):
        load_trained(fresh, {k: v for k, v in list(model_sd.items())[1:]})


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_output_equals_base_plus_adapter(folders, arch):
    _, _, model, batch = _lora_model(folders[arch], **{"model.lora.dropout": 0.0})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    model.eval()
    with torch.no_grad():
        adapted = TASK.forward(model, batch)
        base_only = model.get_base_model()
        with model.disable_adapter():
            plain = TASK.forward(model, batch)
        merged = TASK.forward(model.merge_and_unload(), batch)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter changes the output
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert base_only is not None


def test_activation_checkpointing_gives_the_same_gradients(folders):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        _, _, model, batch = _lora_model(folders["llama"], **{"model.activation_checkpointing": ckpt,
                                                               "model.lora.dropout": 0.0})
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        TASK.loss(TASK.forward(model, batch), batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[1].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_examples_attend_only_to_themselves(folders, arch):
    """Packing changes throughput, not what is learned: the same logits per example and the same loss."""
    cfg = job(folders[arch], **{"data.chat.packing": True, "data.chat.mask_prompt": False, "data.chat.max_length": 64})
    rows = [CHAT, {"prompt": "reverse: c d e", "completion": "e d c"}, {"text": "to be or not"}]
    table = {"id": np.arange(3), "record": np.array([json.dumps(r) for r in rows], dtype=object)}
    state = TASK.fit(table, cfg, {})
    packed = TASK.encode_batch(table, {**state, "split": "train"})
    single = TASK.encode_batch(table, {**state, "split": "val"})  # held-out splits stay one example per row
    assert len(packed["input_ids"]) < 3 and len(single["input_ids"]) == 3
    assert max(s.max() for s in packed["segments"]) >= 2  # a row holds more than one example
    model = TASK.build_model(cfg.model.model_dump(mode="json"), TASK.features({}, state)).eval()
    tensors = lambda enc: {k: torch.from_numpy(v) for k, v in TASK.transform_batch(enc, state).items()}  # noqa: E731
    pb, sb = tensors(packed), tensors(single)
    with torch.no_grad():
        pl, sl = TASK.forward(model, pb), TASK.forward(model, sb)
        example = 0
        for row, segs in enumerate(packed["segments"]):
            start = 0
            for seg in np.unique(segs):
                n = int((segs == seg).sum())
                assert torch.allclose(pl[row, start:start + n - 1], sl[example, :n - 1], atol=1e-4), example
                start, example = start + n, example + 1
        assert example == 3
        ps, ss = TASK.eval_sums(pl, pb), TASK.eval_sums(sl, sb)
    assert ps["tokens"] == ss["tokens"]  # no target across an example boundary
    assert ps["loss_sum"] == pytest.approx(ss["loss_sum"], rel=1e-4)


def test_lora_target_modules_are_checked(folders):
    with pytest.raises(ConfigError, match="model.lora"):
        _lora_model(folders["llama"], **{"model.lora.target_modules": ["no_such_proj"]})


def test_config_errors_name_the_fix(folders, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from: required field is missing"):
        validate({"name": "t", "task": "causal_lm", "model": {"arch": "hf"}, "data": {"source": "synthetic-instructions"},
                  "registry": {"model_name": "t"}})
    with pytest.raises(ConfigError, match="does not fit task 'causal_lm'"):
        job(folders["llama"], **{"data.source": "mnist"})
    with pytest.raises(ConfigError, match="train.method: lora fine-tunes a pretrained causal LM"):
        validate({"name": "t", "task": "image_classification", "train": {"method": "lora"},
                  "registry": {"model_name": "t"}})
    with pytest.raises(ConfigError, match="data.format: jsonl"):
        job(folders["llama"], **{"data.source": "files", "data.path": "x.csv", "data.format": "csv"})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"lacks weights \(\*.safetensors\), a tokenizer"):
        TASK.fit({}, job(empty), {})
    with pytest.raises(ConfigError, match="over the base model's context"):
        TASK.fit({}, job(folders["llama"], **{"data.chat.max_length": 1000}), {})


def test_an_architecture_transformers_cannot_load_is_a_clear_error(folders, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(folders["llama"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-arch"}))
    state = {"base": {"path": str(odd)}}
    with pytest.raises(ConfigError, match="transformers cannot load"):
        TASK.build_model({"arch": "hf"}, state)


def test_over_long_rows_are_rejected_with_their_length(folders):
    cfg = job(folders["llama"], **{"data.chat.max_length": 16})
    table = {"id": np.arange(2), "record": np.array([
        json.dumps({"prompt": "a", "completion": "b"}),
        json.dumps({"prompt": "reverse: a b c d e f g h", "completion": "h g f e d c b a"})], dtype=object)}
    reasons = TASK.validate(table, cfg, {})
    assert reasons[0] == "" and reasons[1].startswith("over data.chat.max_length (") and "> 16 tokens" in reasons[1]
