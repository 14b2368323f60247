"""Offline/edge pieces without a cluster: int8 storage round trip, pruning masks, the distillation loss, the
GPT-2 name mapping both ways, the edge runner's numpy transforms, and the batch_infer/compress config."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from aidc.train.hooks import soft_target_loss, training_hooks
from aidc.compress.job import prune_masks
from aidc.models.quantize import load_weights, quantize
from aidc.tasks import get_task

MODELS = {
    "image_classification": ({"arch": "cnn", "channels": [8], "hidden": 16, "dropout": 0.1},
                             {"image_shape": [8, 8], "num_classes": 10, "raw_range": [0, 16]},
                             lambda: {"x": torch.randn(4, 1, 8, 8)}),
    "text_classification": ({"arch": "transformer", "d_model": 32, "heads": 4, "layers": 1, "dropout": 0.1},
                            {"vocab_size": 100, "max_length": 16, "num_classes": 2},
                            lambda: {"x": torch.randint(3, 100, (4, 16))}),
    "language_model": ({"arch": "gpt", "d_model": 32, "heads": 4, "layers": 1, "dropout": 0.0,
                        "activation_checkpointing": False, "gelu": "tanh"},
                       {"vocab_size": 50, "block_size": 16, "tokenizer": "char"},
                       lambda: {"x": torch.randint(0, 50, (4, 16))}),
    "tabular_classification": ({"arch": "mlp", "hidden": [32, 16], "dropout": 0.1, "embed_dim": 4},
                               {"numeric": ["a", "b"], "categorical": ["c"], "cardinalities": [3], "num_classes": 2},
                               lambda: {"x": torch.randn(4, 2), "cat": torch.randint(0, 3, (4, 1))}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_versions_store_plain_tensors_and_load_back_bit_exact(name):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    torch.manual_seed(0)
    model_cfg, features, batch = MODELS[name]
    task = get_task(name)
    model = task.build_model(model_cfg, features).eval()
    x = batch()
    reference = task.forward(model, x)
    quantized, state, spec = quantize(copy.deepcopy(model))
    assert spec["weights"] and all(state[k].dtype == torch.int8 for k in spec["weights"])
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-storable, no pickle
    loaded = load_weights(task.build_model(model_cfg, features), state, {"quantization": spec}, torch.device("cpu")).eval()
    assert any(isinstance(m, QLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(task.forward(loaded, x), task.forward(quantized, x))  # what was quantized runs
        assert (task.forward(loaded, x) - reference).abs().max() < 0.1  # and it is close to the float model
    if name == "language_model":  # the tied head stays float, tied to the token embedding
        assert loaded.head.weight is loaded.tokens.weight


@pytest.mark.parametrize("norm_first", [True, False])
def test_int8_encoder_layers_run_int8_attention_with_the_regular_paths_masks(norm_first):
    """A quantized TransformerEncoderLayer runs its own forward: int8 in/out projections around one
    scaled_dot_product_attention call. It must give what the float layer's regular path gives (up to int8
    rounding) under every mask the regular path takes, and each mask must change the result."""
    from torch import nn

    from aidc.models.quantize import _quantize_dynamic

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, 0.1, batch_first=True, norm_first=norm_first)
    reference = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    encoder = _quantize_dynamic(copy.deepcopy(reference))
    attn = encoder.layers[0].self_attn
    assert attn.in_proj_weight is None and not hasattr(attn, "out_proj")  # int8 only, no float copy kept
    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:], pad[2, 3:] = True, True
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    banded = torch.randn(3 * 4, 10, 10)  # float, per batch and head
    cases = {"none": {}, "padding": {"src_key_padding_mask": pad},
             "causal": {"mask": causal, "is_causal": True},
             "bool mask + padding": {"mask": torch.rand(10, 10) > 0.7, "src_key_padding_mask": pad},
             "float per-head mask": {"mask": banded}}
    outs = {}
    for name, kw in cases.items():
        want = reference(x, **kw).detach()  # grad mode: the regular path (inference mode's fused one NaNs on 3-D masks)
        with torch.inference_mode():
            got = encoder(x, **kw)
        ok = ~pad[..., None].expand_as(got) if "src_key_padding_mask" in kw else torch.ones_like(got, dtype=bool)
        err = (want - got)[ok].abs().max()
        assert err < 0.1, (name, err)
        outs[name] = (got, err)
    for name in ("padding", "causal", "float per-head mask"):  # each mask is really applied
        got, err = outs[name]
        assert (got - outs["none"][0]).abs().max() > 5 * err, name


def test_pruning_masks_hit_the_sparsity_and_the_loop_hook_keeps_it():
    torch.manual_seed(0)
    model_cfg, features, batch = MODELS["tabular_classification"]
    task = get_task("tabular_classification")
    model = task.build_model(model_cfg, features)
    state, masks = prune_masks(model, 0.6)
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int((m == 0).sum()) for m in masks.values()) / total - 0.6) < 0.01
    fresh = task.build_model(model_cfg, features)
    loss_fn, after_step = training_hooks({"compress": {"init_state": state, "masks": masks}}, task, fresh, "cpu")
    opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
    b = {**batch(), "y": torch.tensor([0, 1, 0, 1])}
    loss_fn(fresh, b).backward()
    opt.step()
    after_step()
    params = dict(fresh.named_parameters())
    for k, mask in masks.items():
        assert torch.all(params[k][mask == 0] == 0), k


def test_distillation_loss_mixes_labels_and_soft_targets():
    s = torch.randn(6, 5)
    assert soft_target_loss(s, s.clone(), 2.0).abs() < 1e-6  # same distribution: no KL
    assert soft_target_loss(s, -s, 2.0) > 0.1
    assert soft_target_loss(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 2.0]), 2.0) == pytest.approx(2.0)  # MSE
    assert soft_target_loss(torch.randn(2, 7, 11), torch.randn(2, 7, 11), 1.0) > 0  # per-token LM logits

    torch.manual_seed(0)
    model_cfg, features, batch = MODELS["image_classification"]
    task = get_task("image_classification")
    teacher = task.build_model(model_cfg, features).eval()
    student = task.build_model({**model_cfg, "channels": [4], "hidden": 8}, features)
    b = {**batch(), "y": torch.tensor([1, 2, 3, 4])}
    t = {"model": model_cfg, "features": features, "spec": {}, "state": teacher.state_dict()}
    hard_only, _ = training_hooks({"compress": {"teacher": t, "alpha": 0.0, "temperature": 2.0}}, task, student, "cpu")
    soft_only, _ = training_hooks({"compress": {"teacher": t, "alpha": 1.0, "temperature": 2.0}}, task, student, "cpu")
    student.eval()
    with torch.no_grad():
        assert hard_only(student, b) == pytest.approx(float(task.loss(task.forward(student, b), b)), rel=1e-5)
        expected = soft_target_loss(task.forward(student, b), task.forward(teacher, b), 2.0)
        assert soft_only(student, b) == pytest.approx(float(expected), rel=1e-5)


def test_gpt2_export_names_invert_the_import(tmp_path):
    import json

    from safetensors.torch import save_file

    from aidc.hf.gpt2 import gpt2_state, tokenizer_json
    from aidc.hf.gpt2 import convert_gpt2

    model_cfg, features, _ = MODELS["language_model"]
    model = get_task("language_model").build_model(model_cfg, features)
    exported = gpt2_state(model.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in exported and "lm_head.weight" not in exported
    assert exported["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    save_file(exported, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 32, "n_head": 4, "n_layer": 1,
        "activation_function": "gelu_new", "eos_token_id": 2}))
    vocab = ["<pad>", "<unk>", "<eos>", *"abcdefghij\n :"]
    tok = {"kind": "char", "vocab": vocab, "vocab_size": len(vocab), "lowercase": False, "pad_id": 0, "unk_id": 1,
           "eos_id": 2}
    (tmp_path / "tokenizer.json").write_text(tokenizer_json(tok))
    state, spec = convert_gpt2(tmp_path)
    assert spec["model"]["gelu"] == "tanh"
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(tokenizer_json(tok))
    assert t.encode("ab\nz c").ids == [3, 4, 13, 1, 14, 5] and t.decode([3, 4, 13, 5]) == "ab\nc"


@pytest.mark.parametrize("lowercase", [False, True])
def test_char_tokenizer_gives_the_hugging_face_exports_ids_special_tokens_included(lowercase):
    """A served char-level GPT and its Hugging Face export (what vLLM and lm-eval load) tokenize alike: special
    tokens written in the text are those tokens ("<eos>" is id 2, as the BPE kind already did), unknown
    characters are <unk>, lowercasing leaves the specials alone."""
    from tokenizers import Tokenizer

    from aidc.data.tokenizer import encode, train_tokenizer
    from aidc.hf.gpt2 import tokenizer_json

    state = train_tokenizer(["Hello there, <world>!", "abc xyz"], "char", 0, lowercase)
    hf = Tokenizer.from_str(tokenizer_json(state))
    for text in ["Hello<eos>there", "<eos>", "<pad><unk>x<eos", "Q<EOS>\u00e9", "plain text", "<w>", ""]:
        assert encode([text], state)[0] == hf.encode(text).ids, text
    assert encode(["a<eos>"], state)[0][-1] == state["eos_id"]


def test_edge_runner_transforms_match_the_platform_ones():
    from aidc.data.transforms import apply_index_map, standardize
    from aidc.export import edge_runner

    state = {"mean": 3.7, "std": 2.1}
    x = np.random.default_rng(0).uniform(0, 16, (5, 8, 8))
    assert np.array_equal(edge_runner._standardize(x, state), standardize(x, state))
    cols = {"mean": [0.5, -1.0], "std": [2.0, 0.25]}
    t = np.random.default_rng(1).normal(size=(7, 2))
    assert np.array_equal(edge_runner._standardize(t, cols), standardize(t, cols))
    mapping = [3, 10, 42]
    values = np.array([42, 3, 7, 10, 0])
    assert edge_runner._index(values.tolist(), mapping).tolist() == apply_index_map(values, mapping).tolist()
    names = ["blue", "green", "red"]
    assert edge_runner._index(["red", "violet"], names).tolist() == apply_index_map(np.array(["red", "violet"]),
                                                                                     names).tolist()


def test_batch_infer_and_compress_sections_validate_with_clear_errors(capsys):
    from aidc.config import load_config
    from aidc.errors import ConfigError
    from jobs.batch_infer import main as batch_main
    from jobs.compress import main as compress_main
    from tests.conftest import CONFIGS

    cfg = load_config(CONFIGS / "digits.yaml")
    assert cfg.batch_infer.actors == 2 and cfg.batch_infer.split == "test" and cfg.compress is None
    with pytest.raises(ConfigError, match="path needs format"):
        load_config(CONFIGS / "digits.yaml", ["batch_infer.path=rows.csv"])
    with pytest.raises(ConfigError, match="compress.method"):
        load_config(CONFIGS / "digits.yaml", ["compress.method=int4"])
    with pytest.raises(ConfigError, match="compress.sparsity"):
        load_config(CONFIGS / "digits.yaml", ["compress.method=prune", "compress.sparsity=1.5"])
    assert batch_main(["--config", str(CONFIGS / "digits.yaml"), "--dry-run"]) == 0
    assert "would score with digits-cnn@champion on 2 actor(s)" in capsys.readouterr().out
    assert compress_main(["--config", str(CONFIGS / "digits.yaml"), "--dry-run"]) == 2  # no compress section
    assert "needs a compress section" in capsys.readouterr().err


def test_batch_actors_share_the_gpus_so_every_actor_fits():
    """More actors than GPUs: each asks an even share that packs within one GPU (a whole GPU each left the
    pool's actors past the GPU count unplaceable; seen on a 1-GPU machine); a configured share is checked."""
    from aidc.runtime import gpu_share, share_fits

    for gpus, actors, share in [(1, 1, 1.0), (4, 2, 1.0), (1, 2, 0.5), (2, 3, 0.5), (1, 3, 1 / 3), (3, 8, 1 / 3)]:
        assert gpu_share(gpus, actors) == pytest.approx(share)
        assert share_fits(gpus, actors, gpu_share(gpus, actors))
    assert gpu_share(0, 2) == 0
    assert not share_fits(1, 2, 0.6) and not share_fits(2, 3, 2 / 3) and share_fits(1, 3, 0.3333)
    assert not share_fits(1, 2, 1.0) and share_fits(2, 2, 1.0)
