import numpy as np
import pytest
import torch

from aidc.config import load_config
from aidc.errors import ConfigError
from aidc.models import GPT, MatrixFactorization, TextTransformer
from aidc.registry import export_model_dir
from aidc.tasks.loaded import LoadedModel
from aidc.tasks import get_task
from aidc.train.loop import warmup_cosine
from aidc.train.parallel import autocast, grad_scaler, resolve_precision
from tests.conftest import CONFIGS


def test_warmup_then_cosine_down_to_the_floor():
    f = warmup_cosine(total_steps=100, warmup_steps=10, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=0.01)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_precision_selects_itself_from_the_device():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) == "bf16"  # no grad scaler without a GPU
    assert resolve_precision("bf16", cpu) == "bf16"
    with autocast("bf16", cpu):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not grad_scaler("bf16", cpu).is_enabled()


def test_full_state_is_a_snapshot_not_a_view_of_live_weights():
    from aidc.train.parallel import full_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    snap, opt_snap = full_state(model, opt, "ddp")
    before = snap["weight"].clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert torch.equal(snap["weight"], before) and not torch.equal(model.weight.detach(), before)
    assert opt_snap["state"][0]["step"] == 1


def test_model_must_fit_the_task():
    with pytest.raises(ConfigError, match="model.arch 'gpt' does not fit task 'image_classification'"):
        load_config(CONFIGS / "digits.yaml", ["model={arch: gpt}"])
    with pytest.raises(ConfigError, match=r"heads \(3\) must divide d_model \(64\)"):
        load_config(CONFIGS / "sms-spam.yaml", ["model.heads=3"])
    with pytest.raises(ConfigError, match="needs 1 <= min <= max"):
        load_config(CONFIGS / "digits.yaml", ["resources.num_workers=[3, 2]"])


def test_gpt_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = GPT(20, 16, d_model=16, heads=2, layers=2, dropout=0.0)
    b = GPT(20, 16, d_model=16, heads=2, layers=2, dropout=0.0, activation_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 20, (2, 16))
    for m in (a, b):
        m.train()
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    assert torch.allclose(a.tokens.weight.grad, b.tokens.weight.grad, atol=1e-6)


def _serve(tmp_path, task_name, model, spec_extra):
    spec = {"task": task_name, **spec_extra}
    d = tmp_path / task_name
    export_model_dir(d, state_dict=model.state_dict(), spec=spec, config_yaml="x: 1\n")
    return LoadedModel.from_dir(d)


def test_every_task_answers_through_the_serving_loader(tmp_path):
    from aidc.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["free prize now", "see you at lunch"] * 10, "bpe", 300, True)
    text = _serve(tmp_path, "text_classification", TextTransformer(tok["vocab_size"], 16, 2, d_model=16),
                  {"model": {"arch": "transformer", "d_model": 16, "heads": 4, "layers": 2, "dropout": 0.1},
                   "features": {"vocab_size": tok["vocab_size"], "max_length": 16, "num_classes": 2},
                   "transform": {"tokenizer": tok, "max_length": 16}})
    x = get_task("text_classification").parse_instances(["Free prize!!"], text.spec["features"], 8)
    assert len(text.predict(x)[0]["probabilities"]) == 2

    mf = _serve(tmp_path, "recommendation", MatrixFactorization(3, 4, dim=4),
                {"model": {"arch": "mf", "dim": 4, "dropout": 0.0},
                 "features": {"num_users": 3, "num_items": 4, "global_mean": 3.5, "rating_range": [0.5, 5]},
                 "transform": {"users": [10, 20, 30], "items": [1, 2, 3, 4], "global_mean": 3.5}})
    pairs = get_task("recommendation").parse_instances([{"user": 10, "item": 4}, {"user": 99, "item": 1}],
                                                       mf.spec["features"], 8)
    ratings = [p["rating"] for p in mf.predict(pairs)]
    assert all(0.5 <= r <= 5 for r in ratings)

    char = train_tokenizer(["to be or not to be"], "char", 0, False)
    lm = _serve(tmp_path, "language_model", GPT(char["vocab_size"], 32, d_model=16, heads=2, layers=1),
                {"model": {"arch": "gpt", "d_model": 16, "heads": 2, "layers": 1, "dropout": 0.1},
                 "features": {"vocab_size": char["vocab_size"], "block_size": 32},
                 "transform": {"tokenizer": char, "block_size": 32}})
    out = lm.predict(np.array(["to be"], dtype=object))
    assert isinstance(out[0]["text"], str) and len(out[0]["text"]) > 0
