"""Helpers that tests and benchmarks share (as torch.testing): a free local port, a Serve instance started and
shut down completely, and tiny randomly initialised Hugging Face model folders made locally (nothing is
downloaded from a model hub).

Nothing in the platform imports this module.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path


_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, and never one this process was given before: the kernel may hand the
    same ephemeral port to two binds in a row once the first socket is closed, and two Ray components asked to
    share one port refuse to start (`ray start` failed so in CI: the GCS and the agent both got 46633)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def serve_start(**options) -> None:
    """`serve.start(**options)` on a Ray where no Serve instance is left, so that the options apply.

    `serve.start` attaches to a Serve controller that is still running and ignores new options, and
    `serve.shutdown` returns after 30 s while the controller may still be stopping its replicas (a module's
    apps on a loaded 2-core machine). In CI a module's serve.start so attached to the previous module's
    controller: its apps were served on the old ports (the new one refused connections) and its HAProxy, given
    the old gRPC port again, could not bind it."""
    serve_shutdown()
    from ray import serve

    serve.start(**options)


def serve_shutdown(timeout_s: float = 300.0) -> None:
    """`serve.shutdown()`, then wait until the Serve controller is gone (it is once it has stopped every app,
    proxy and replica)."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    def controller():
        try:
            return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return None

    if not ray.is_initialized() or controller() is None:
        return
    serve.shutdown()
    if (left := controller()) is not None:  # still stopping, or serve.shutdown's 5 s ping of it timed out: ask
        left.graceful_shutdown.remote(wait=False)
    deadline = time.monotonic() + timeout_s
    while controller() is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve's controller is still running {timeout_s:.0f} s after serve.shutdown(): "
                               "see its log (logs/serve/controller_*.log in the Ray session dir)")
        time.sleep(0.5)


SENTENCES = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question",
             "all the world's a stage, and all the men and women merely players", "hello world"] * 4


def make_tiny_gpt2(directory: Path, n_positions: int = 64, n_embd: int = 32, n_layer: int = 2,
                   n_head: int = 4) -> Path:
    """config.json + model.safetensors (GPT2LMHeadModel.save_pretrained) + a byte-level BPE tokenizer.json
    trained on a few sentences, whose end-of-text token is its last id (as in GPT-2)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=eos, eos_token_id=eos)
    directory.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(cfg).save_pretrained(str(directory))
    tok.save(str(directory / "tokenizer.json"))
    return directory


def make_tiny_llama(directory: Path, max_positions: int = 512, hidden: int = 64, layers: int = 2,
                    heads: int = 2) -> Path:
    """A tiny randomly initialised Llama-architecture folder (LlamaForCausalLM.save_pretrained) with the same
    kind of byte-level BPE tokenizer, its special tokens and a chat template in tokenizer_config.json."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    gpt2 = make_tiny_gpt2(directory)  # its tokenizer.json; the GPT-2 weights are replaced below
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        (gpt2 / f).unlink(missing_ok=True)
    vocab = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) + 1
    eos = vocab - 1
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "model_max_length": max_positions,
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    return directory


# Ordinary text with numbers and dots that is no personal data: a scrubber must leave every one as it is.
NOT_PERSONAL = ["Congrats, you came 2nd!", "Win £1000 cash now", "see you at 10:30 tomorrow", "call me in 5 mins",
                "1st prize is a 2-week holiday", "it costs $19.99 or 20% off", "version 2.1.3 is out",
                "card ending 4111 1111 1111 1112 declined", "txt STOP to end, 150p/msg", "meet on 12/03 at 3pm",
                "ok lor... u r 2 gud 4 me", "pi is 3.14159", "I'll be there in 15-20 minutes", "room 101, floor 3",
                "score was 3-1", "I.O.U. one", "e.g. this and that", "Dear Mr.Smith, thanks"]


def planted_personal_data(n_per_type: int = 100, seed: int = 0) -> list[tuple[str, str, str]]:
    """Sentences each holding one known piece of personal data: (type, the value, the sentence). Cards pass the
    Luhn check and IBANs ISO 7064 (as real ones do); phone numbers are valid for their region by
    libphonenumber, written in international, national and E.164 forms."""
    import random

    import phonenumbers

    rng = random.Random(seed)
    names = ["john", "mary", "wei", "ana", "olu", "sven", "priya", "li"]
    words = ["acme", "example", "shop", "news", "uni-bonn", "data", "my-site", "alpha"]

    def luhn_complete(prefix: str, length: int) -> str:
        body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
        total = 0
        for i, d in enumerate(reversed(body)):
            d = int(d) * (2 if i % 2 == 0 else 1)
            total += d - 9 if d > 9 else d
        return body + str((10 - total % 10) % 10)

    def card() -> str:
        number = luhn_complete(*rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)]))
        style = rng.choice(["plain", "space", "dash"])
        if style == "plain":
            return number
        groups = [number[i:i + 4] for i in range(0, len(number), 4)]
        return (" " if style == "space" else "-").join(groups)

    def iban() -> str:
        country, length = rng.choice([("GB", 22), ("DE", 22), ("FR", 27), ("NL", 18), ("ES", 24)])
        if country in ("GB", "NL"):
            bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + \
                "".join(rng.choice("0123456789") for _ in range(length - 8))
        else:
            bban = "".join(rng.choice("0123456789") for _ in range(length - 4))
        digits = "".join(str(int(c, 36)) for c in bban + country + "00")
        code = f"{country}{98 - int(digits) % 97:02d}{bban}"
        return " ".join(code[i:i + 4] for i in range(0, len(code), 4)) if rng.random() < 0.5 else code

    def phone() -> str:
        region = rng.choice(["US", "GB", "DE", "FR", "IN", "CA", "BR"])
        example = phonenumbers.example_number_for_type(region, rng.choice(
            [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]))
        while True:
            national = str(example.national_number)
            digits = national[:-4] + "".join(rng.choice("0123456789") for _ in range(4))
            number = phonenumbers.parse(f"+{example.country_code}{digits}")
            if phonenumbers.is_valid_number(number):
                break
        form = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164,
                           phonenumbers.PhoneNumberFormat.NATIONAL if region == "US" else
                           phonenumbers.PhoneNumberFormat.INTERNATIONAL])
        return phonenumbers.format_number(number, form)

    make = {
        "email": lambda: f"{rng.choice(names)}.{rng.choice(names)}{rng.randint(1, 99)}@"
                         f"{rng.choice(words)}.{rng.choice(['com', 'org', 'co.uk', 'de', 'io'])}",
        "phone": phone,
        "credit_card": card,
        "iban": iban,
        "ip_address": lambda: ".".join(str(rng.randint(1, 254)) for _ in range(4)),
        "url": lambda: rng.choice([f"https://www.{rng.choice(words)}.{rng.choice(['com', 'org', 'net'])}/"
                                   f"{rng.choice(words)}?id={rng.randint(1, 999)}",
                                   f"www.{rng.choice(words)}{rng.randint(1, 99)}.co.uk",
                                   f"{rng.choice(words)}.com/{rng.choice(words)}"]),
    }
    templates = ["contact me at {} tomorrow", "my details: {}. thanks!", "{} is what you asked for",
                 "Please send it to {} asap", "ok lor, its {} i think", "URGENT! reply with {} now"]
    return [(kind, value, rng.choice(templates).format(value))
            for kind, fn in make.items() for value in (fn() for _ in range(n_per_type))]
