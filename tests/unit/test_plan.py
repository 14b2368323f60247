"""Capacity planner (aidc.plan): the arithmetic against hand-computed figures, devices from cluster.yaml
labels, wall-clock and cost, the fixes it names, and refusal."""

from __future__ import annotations

import math

import pytest
import yaml

from aidc import plan
from aidc.config import load_config
from aidc.errors import ConfigError
from tests.conftest import CONFIGS, REPO

GIB = 2**30


def _gpt(tmp_path, *extra):
    # before preprocessing a char-level GPT's vocabulary is sized as bytes: 256
    return load_config(CONFIGS / "shakespeare-gpt.yaml", [
        f"run.storage={tmp_path}", "model.d_model=64", "model.heads=4", "model.layers=2", "model.dropout=0.0",
        "data.text.block_size=64", "train.batch_size=4", *extra])


def _gpt_params(vocab: int, block: int, d: int, layers: int) -> tuple[int, int]:
    """By hand: token + position embeddings, per block LayerNorm (2d), qkv (d x 3d + 3d), proj (d x d + d),
    LayerNorm (2d), MLP (d x 4d + 4d, 4d x d + d); final LayerNorm; the head is tied to the token embedding."""
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return vocab * d + block * d + layers * per_block + 2 * d, per_block


def test_gpt_parameters_and_per_worker_bytes_match_hand_computed_figures(tmp_path):
    shape = plan.model_shape(_gpt(tmp_path), "gpu")
    params, block = _gpt_params(256, 64, 64, 2)
    assert (params, block) == (120_576, 49_984)
    assert shape.params == params and shape.largest_block == block

    ddp = plan.memory(shape, workers=2, parallelism="ddp", precision="fp32", checkpointing=False, framework_bytes=0)
    assert ddp.parameters == params * 4  # fp32 master weights
    assert ddp.gradients == params * 4 * 2  # fp32 gradients + DDP's bucket copy
    assert ddp.optimizer == params * 8  # AdamW: two fp32 moments
    fsdp = plan.memory(shape, workers=4, parallelism="fsdp", precision="fp32", checkpointing=False,
                       framework_bytes=0)
    assert fsdp.parameters == params * 4 / 4 + 2 * block * 4  # a shard + two gathered blocks (prefetch)
    assert fsdp.gradients == params * 4 / 4 and fsdp.optimizer == params * 8 / 4
    one = plan.memory(shape, workers=1, parallelism="fsdp", precision="fp32", checkpointing=False,
                      framework_bytes=0)
    assert one.gradients == params * 4  # one worker: nothing to shard, no DDP buckets
    half = plan.memory(shape, workers=1, parallelism="ddp", precision="bf16", checkpointing=False,
                       framework_bytes=0)
    assert half.activations == one.activations / 2 and half.parameters == one.parameters  # autocast: fp32 weights


def test_private_training_counts_the_per_sample_gradients_opacus_keeps(tmp_path):
    """DP-SGD keeps a gradient per sample of every trained weight: the planner's figure for a batch equals the
    bytes of Opacus's grad_sample tensors after one backward of that batch (digits CNN, GroupNorm); the fixes it
    names for a job that cannot fit keep to what DP-SGD runs (no FSDP, no accumulation)."""
    import torch
    from opacus import GradSampleModule

    from aidc.tasks import get_task
    from aidc.train.privacy import private_model

    cfg = load_config(CONFIGS / "digits.yaml", [f"run.storage={tmp_path}", "model.norm=group",
                                                "train.privacy.epsilon=8", "train.batch_size=16"])
    shape = plan.model_shape(cfg, "cpu")
    batch = 16
    mem = plan.memory(shape, workers=2, parallelism="ddp", precision="fp32", checkpointing=False, framework_bytes=0,
                      per_sample_batch=batch)
    features = plan.planning_features(cfg, None)  # as the planner sizes the model before preprocessing
    model = GradSampleModule(private_model(get_task("image_classification").build_model(cfg.model.model_dump(),
                                                                                        features)))
    side = features["image_shape"][0]
    model(torch.randn(batch, 1, side, side)).sum().backward()
    kept = sum(p.grad_sample.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert mem.per_sample == kept == batch * shape.trained * 4
    assert mem.total == pytest.approx(plan.memory(shape, workers=2, parallelism="ddp", precision="fp32",
                                                  checkpointing=False, framework_bytes=0).total + kept)
    # in a plan: the largest Poisson batch, shown as its own line item; a plain job counts none
    device = plan.local_device(2, 1.0)
    private = plan.plan_for(cfg, shape, device)
    assert private.memory.per_sample == pytest.approx(plan.poisson_peak(16) * shape.trained * 4)
    assert "per-sample gradients (DP-SGD)" in plan.format_plans(cfg, [private])
    plain = load_config(CONFIGS / "digits.yaml", [f"run.storage={tmp_path}", "train.batch_size=16"])
    assert plan.plan_for(plain, shape, device).memory.per_sample == 0
    # a device too small: the fix is a smaller batch alone (accumulation and FSDP are refused under DP-SGD)
    budget = private.memory.total - 0.3 * private.memory.per_sample  # fits at half the batch, not at this one
    tiny = plan.Device(**{**device.__dict__, "memory_gib": budget / 0.9 / GIB})
    fixed = plan.with_fixes(cfg, lambda c, kind: plan.model_shape(c, kind), plan.plan_for(cfg, shape, tiny), [])
    assert fixed.fixes and "grad_accum" not in fixed.fixes[0] and "fsdp" not in fixed.fixes[0], fixed.fixes
    assert "train.batch_size=" in fixed.fixes[0], fixed.fixes


def test_llama_fine_tune_full_and_lora_match_hand_computed_figures(tmp_path):
    """A Hugging Face Llama base (config.json only is read: built on the meta device), fully fine-tuned and with
    LoRA rank 8 on PEFT's default q_proj + v_proj: parameters, the adapters that train, and per-worker bytes."""
    import json

    from aidc.testing import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "llama", hidden=64, layers=2, heads=2)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    h, i, layers, r = 64, 128, 2, 8
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o (no bias); gate, up, down; two RMSNorms
    params = 2 * vocab * h + layers * per_layer + h  # embeddings, untied head, final norm

    def cfg(*extra):
        return load_config(CONFIGS / "chat-sft.yaml", [f"run.storage={tmp_path}", f"model.init_from={folder}",
                                                       "data.chat.max_length=128", "train.batch_size=4", *extra])

    full = plan.model_shape(cfg(), "cpu")
    assert full.params == params and full.trainable is None and full.largest_block == per_layer
    assert full.tokens_per_sample == 127 and full.unit == "tokens"
    lora = plan.model_shape(cfg("train.method=lora", "model.lora.rank=8"), "cpu")
    adapters = layers * 2 * (r * h + h * r)  # q_proj and v_proj: A (r x 64) + B (64 x r) each
    assert lora.trainable == adapters and lora.params == params + adapters
    ddp = plan.memory(lora, workers=2, parallelism="ddp", precision="fp32", checkpointing=False, framework_bytes=0)
    assert ddp.parameters == lora.params * 4  # the frozen base is held whole
    assert ddp.gradients == adapters * 4 * 2 and ddp.optimizer == adapters * 8  # of the adapters only
    assert lora.saved_fp32 < full.saved_fp32 * 1.2 and lora.flops < full.flops  # no weight gradients of the base
    ckpt = plan.model_shape(cfg("model.activation_checkpointing=true"), "cpu")
    assert ckpt.saved_ckpt_fp32 < ckpt.saved_fp32 and ckpt.flops_ckpt > ckpt.flops


def test_activations_follow_the_shapes_and_checkpointing_saves_them(tmp_path):
    small = plan.model_shape(_gpt(tmp_path), "gpu")
    double = plan.model_shape(_gpt(tmp_path, "train.batch_size=8"), "gpu")
    assert double.saved_fp32 == pytest.approx(2 * small.saved_fp32, rel=1e-3)  # linear in the micro-batch
    assert small.saved_ckpt_fp32 < small.saved_fp32
    assert 1.2 < small.flops_ckpt / small.flops < 1.5  # one more forward of the blocks
    # the forward + backward of the matmuls alone: 6 FLOPs per weight per token (Kaplan et al.)
    tokens = 4 * 64
    matmul_weights = 2 * (3 * 64 * 64 + 64 * 64 + 8 * 64 * 64) + 64 * 256  # blocks + head
    assert small.flops >= 6 * matmul_weights * tokens
    # on CPU with attention dropout, SDPA runs the math path and keeps the seq x seq weights
    cpu = plan.model_shape(_gpt(tmp_path, "model.dropout=0.1"), "cpu")
    assert cpu.saved_fp32 > small.saved_fp32 + 2 * 4 * 4 * 64 * 64 * 4  # 2 layers x b x heads x s x s x fp32


def _cluster(tmp_path, **labels) -> str:
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    spec = raw["available_node_types"]["gpu-l4x4"]
    spec["labels"] = {f"aidc.io/{k.replace('_', '-')}": v for k, v in labels.items()}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_devices_come_from_node_labels_and_the_catalogue(tmp_path):
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    devs = {d.node_type: d for d in plan.devices(raw, 1.0, "auto")}
    assert set(devs) == {"gpu-a100x8", "gpu-l4x4"}  # the head advertises no GPU
    a100 = devs["gpu-a100x8"]
    assert (a100.name, a100.memory_gib, a100.tflops["bf16"], a100.per_node) == ("A100-80GB", 79.2, 312.0, 8)
    assert a100.usd_per_hour == 40.97
    raw["available_node_types"]["gpu-l4x4"]["labels"] = {"aidc.io/accelerator": "L4",
                                                         "aidc.io/device-memory-gib": "20", "aidc.io/tflops-bf16": "99"}
    l4 = {d.node_type: d for d in plan.devices(raw, 1.0, True)}["gpu-l4x4"]
    assert (l4.memory_gib, l4.tflops["bf16"], l4.tflops["fp32"]) == (20.0, 99.0, 30.3)  # overrides, catalogue
    cpu = plan.devices(raw, 4.0, False)  # a CPU job: the non-head nodes' memory over the workers each holds
    assert {d.node_type for d in cpu} == {"gpu-a100x8", "gpu-l4x4"}
    assert {d.node_type: d.per_node for d in cpu} == {"gpu-a100x8": 24, "gpu-l4x4": 12}
    raw["available_node_types"]["gpu-l4x4"]["labels"] = {"aidc.io/accelerator": "X9"}
    raw["available_node_types"]["gpu-l4x4"]["node_config"]["InstanceType"] = "x9.large"
    with pytest.raises(ConfigError, match="not in aidc's catalogue.*aidc.io/device-memory-gib"):
        plan.devices(raw, 1.0, True)
    raw["available_node_types"]["gpu-l4x4"]["labels"] = {"aidc.io/accelerator": "L4", "aidc.io/usd-per-hour": "cheap"}
    with pytest.raises(ConfigError, match="aidc.io/usd-per-hour='cheap' is not a number"):
        plan.devices(raw, 1.0, True)


def test_steps_wall_clock_cost_and_energy(tmp_path):
    cfg = _gpt(tmp_path, "train.epochs=3", "resources.num_workers=8", "train.grad_accum_steps=2")
    shape = plan.model_shape(cfg, "gpu")
    dev = {d.node_type: d for d in plan.devices(yaml.safe_load((REPO / "cluster.yaml").read_text()), 1.0,
                                                "auto")}["gpu-l4x4"]
    p = plan.plan_for(cfg, shape, dev, train_rows=10_000, mfu=0.5)
    per_epoch = math.ceil(10_000 / (4 * 8)) // 2  # rows / (micro-batch x workers), per optimizer step
    assert p.steps == per_epoch * 3 and p.nodes == 2  # 8 workers on 4-GPU nodes
    assert p.hours == pytest.approx(p.steps * p.step_s / 3600)
    assert p.usd == pytest.approx(p.hours * 2 * 4.60) and p.kwh == pytest.approx(p.hours * 8 * 72 / 1000)
    assert p.comm_s > 0  # across two nodes: the all-reduce over the slower network
    assert p.step_s == pytest.approx(p.compute_s + p.comm_s)


def test_a_plan_that_cannot_fit_names_a_fix_that_fits_and_is_refused(tmp_path):
    cfg = _gpt(tmp_path, "model.d_model=2048", "model.heads=16", "model.layers=24", "data.text.block_size=1024",
               "train.batch_size=8", "resources.num_workers=4")
    plans = plan.make_plans(cfg, _cluster(tmp_path, accelerator="L4"))
    l4 = next(p for p in plans if p.device.node_type == "gpu-l4x4")
    assert not l4.fits and l4.fixes, plan.format_plans(cfg, plans)
    fix = l4.fixes[0]
    overrides = [o for o in fix.split(" (")[0].replace("--set ", "").split() if "=" in o]
    fixed = plan.make_plans(load_config(CONFIGS / "shakespeare-gpt.yaml", [*_overrides(cfg), *overrides]),
                            _cluster(tmp_path, accelerator="L4"))
    assert next(p for p in fixed if p.device.node_type == "gpu-l4x4").fits, fix
    with pytest.raises(ConfigError) as err:
        plan.refuse_if_unfit(cfg, [l4])
    msg = str(err.value)
    assert "the plan does not fit" in msg and "Fix: --set" in msg and "--set train.plan=warn" in msg, msg
    warned = load_config(CONFIGS / "shakespeare-gpt.yaml", [*_overrides(cfg), "train.plan=warn"])
    plan.refuse_if_unfit(warned, [l4])  # warn: printed by jobs.train, not refused


def _overrides(cfg) -> list[str]:
    m, t = cfg.model, cfg.train
    return [f"run.storage={cfg.run.storage}", f"model.d_model={m.d_model}", f"model.heads={m.heads}",
            f"model.layers={m.layers}", "model.dropout=0.0", f"data.text.block_size={cfg.data.text.block_size}",
            f"train.batch_size={t.batch_size}", f"resources.num_workers={cfg.resources.num_workers}"]


def test_calibration_is_recorded_and_used(tmp_path):
    dev = plan.local_device(1, 1.0)
    shape = plan.model_shape(_gpt(tmp_path), dev.kind)
    cfg = _gpt(tmp_path)
    before = plan.plan_for(cfg, shape, dev)
    plan.record_calibration(plan.calibration_key(dev), str(tmp_path), mfu=0.05, per_op_us=100.0,
                            memory_gbps=1.0, framework_gib=0.5)
    assert plan.calibration(dev, str(tmp_path))["mfu"] == 0.05
    # the planner reads the storage root's calibration (AIDC_STORAGE or run.storage's default)
    import os

    old = os.environ.get("AIDC_STORAGE")
    os.environ["AIDC_STORAGE"] = str(tmp_path)
    try:
        after = plan.plan_for(cfg, shape, dev)
    finally:
        os.environ.pop("AIDC_STORAGE") if old is None else os.environ.__setitem__("AIDC_STORAGE", old)
    assert after.step_s > before.step_s * 2 and after.memory.framework == 0.5 * GIB


def test_gpu_names_as_ray_and_cuda_give_them_map_to_the_catalogue():
    assert plan.catalogue_name("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert plan.catalogue_name("A100") == "A100-40GB"  # Ray's name says no size: the smaller, refusing safely
    assert plan.catalogue_name("A100", memory_gib=79.0) == "A100-80GB"
    assert plan.catalogue_name("NVIDIA H200") == "H200" and plan.catalogue_name("H100") == "H100-80GB"
    assert plan.catalogue_name("NVIDIA L40S") is None and plan.catalogue_name("L4") == "L4"  # no prefix match
