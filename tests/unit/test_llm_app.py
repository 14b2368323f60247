"""The llm app's pieces that need no cluster: args, vLLM engine settings, the registry -> Hugging Face folder
check, and the exported tokenizer's special tokens."""

from __future__ import annotations

import pytest

from aidc.errors import AidcError
from aidc.hf.gpt2 import DEFAULT_TEMPLATE, tokenizer_config
from aidc.hf.folder import check_head_dim
from aidc.serving.llm.app import LLMArgs, LocalFolderInit, ModelArgs, llm_config, node_init_needed


def test_defaults_apply_to_every_model_and_a_model_may_override_them():
    args = LLMArgs.model_validate({"models": ["a@champion", {"ref": "b/3", "max_num_seqs": 2}],
                                   "defaults": {"max_num_seqs": 8, "kv_cache_gib": 2}})
    a, b = args.model_args()
    assert (a.ref, a.max_num_seqs, a.kv_cache_gib) == ("a@champion", 8, 2)
    assert (b.ref, b.max_num_seqs) == ("b/3", 2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLMArgs.model_validate({"models": [{"ref": "a", "max_num_seqs": 0}]})
    with pytest.raises(ValueError, match="bogus"):
        LLMArgs.model_validate({"models": ["a"], "bogus": 1})


def test_llm_config_on_cpu_and_on_gpu():
    cpu = llm_config(ModelArgs(ref="m", max_waiting=0), "m", "/tmp/m", 128, metrics=True)
    assert cpu.accelerator_config.kind == "cpu" and cpu.placement_group_config == {"bundles": [{"CPU": 1.0}]}
    kw = cpu.engine_kwargs
    assert kw["max_model_len"] == 128 and kw["block_size"] == 32 and kw["enable_prefix_caching"]
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 2048  # seeded requests on CPU
    assert kw["structured_outputs_config"]["disable_any_whitespace"]
    assert cpu.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert cpu.deployment_config["max_queued_requests"] == 1  # Serve takes no 0: one request may wait
    gpu = llm_config(ModelArgs(ref="m", num_gpus=1, tensor_parallel_size=2, max_model_len=64), "m", "/tmp/m", 128,
                     metrics=False)
    assert gpu.accelerator_config.kind == "gpu" and "block_size" not in gpu.engine_kwargs
    assert "enable_chunked_prefill" not in gpu.engine_kwargs
    assert gpu.placement_group_config["bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert gpu.engine_kwargs["max_model_len"] == 64 and gpu.engine_kwargs["tensor_parallel_size"] == 2


def test_ray_node_initialization_runs_only_where_there_is_something_to_download(tmp_path):
    """Ray Serve LLM downloads a model to every node of the engine's placement group in a task of its own; an
    engine whose folder is on this node (how aidc serves registry versions) skips that task."""
    from ray.llm._internal.serve.core.configs.llm_config import CloudMirrorConfig

    folder = str(tmp_path)
    assert not node_init_needed(folder, None, {"n1"}, "n1")  # the folder is here, the engine too
    assert not node_init_needed(folder, None, set(), "n1")
    assert node_init_needed(folder, None, {"n1", "n2"}, "n1")  # a bundle on another node: Ray's way
    assert node_init_needed(str(tmp_path / "absent"), None, {"n1"}, "n1")  # not a folder here
    assert node_init_needed("org/model", None, {"n1"}, "n1")  # a hub id
    assert node_init_needed(folder, CloudMirrorConfig(bucket_uri="s3://b/m"), {"n1"}, "n1")  # a mirror to fetch
    cfg = llm_config(ModelArgs(ref="m"), "m", folder, 128, metrics=False)
    from ray.llm._internal.common.utils.import_utils import load_class

    assert load_class(cfg.callback_config.callback_class) is LocalFolderInit  # what Ray loads in the replica


def test_a_head_size_vllm_cannot_run_on_cpu_is_refused_naming_the_fix():
    with pytest.raises(AidcError, match=r"tiny/1 has attention heads of size 16.*model.heads=2"):
        check_head_dim("tiny/1", 16, 64, gpu=False)
    with pytest.raises(AidcError, match="multiple of 32"):
        check_head_dim("odd/1", 10, 50, gpu=False)
    check_head_dim("tiny/1", 16, 64, gpu=True)  # GPU attention backends take it
    check_head_dim("ok/1", 32, 64, gpu=False)


def test_an_imported_tokenizer_keeps_its_own_special_tokens():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|endoftext|>"])
    state = {"kind": "bpe", "json": tok.to_str(), "eos_id": 0, "pad_id": None, "unk_id": None}
    cfg = tokenizer_config(state, 64)
    assert cfg["eos_token"] == cfg["bos_token"] == "<|endoftext|>" and "pad_token" not in cfg
    assert cfg["chat_template"] == DEFAULT_TEMPLATE  # no template of its own: aidc's `role: content` lines
    assert tokenizer_config({**state, "chat_template": "{{ x }}"}, 64)["chat_template"] == "{{ x }}"


def test_scrub_replaces_personal_data_in_prompts_and_chat_text_and_leaves_token_ids():
    """The llm app's `scrub` arg, on the requests as Ray Serve LLM parses them (vLLM's protocol classes)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest

    from aidc.data.privacy import Scrubber
    from aidc.serving.llm.app import scrub_prompts

    scrubber = Scrubber(["email", "phone"])
    one = CompletionRequest(model="m", prompt="mail ana@example.com now")
    scrub_prompts(one, scrubber)
    assert one.prompt == "mail <EMAIL> now"
    many = CompletionRequest(model="m", prompt=["call +44 20 7946 0958", "hi"])
    scrub_prompts(many, scrubber)
    assert many.prompt == ["call <PHONE>", "hi"]
    ids = CompletionRequest(model="m", prompt=[12, 40, 41])
    scrub_prompts(ids, scrubber)
    assert ids.prompt == [12, 40, 41]
    chat = ChatCompletionRequest(model="m", messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "I am ana@example.com"}]},
        {"role": "assistant", "content": "noted: ana@example.com"}])
    scrub_prompts(chat, scrubber)
    texts = [m["content"] if isinstance(m, dict) else m.content for m in chat.messages]
    assert texts[0] == "be brief" and texts[2] == "noted: <EMAIL>"
    assert texts[1][0]["text"] == "I am <EMAIL>"
    assert LLMArgs.model_validate({"models": ["m@a"], "scrub": ["email"]}).scrub == ["email"]
    with pytest.raises(Exception, match="scrub"):
        LLMArgs.model_validate({"models": ["m@a"], "scrub": ["person"]})
