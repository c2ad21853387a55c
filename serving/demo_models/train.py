"""Train FleetLens's demo models: tiny Llamas that memorise a seeded `key=value` lookup table.

Run by `fleetlens models make-demo` under the serving venv (`.venv-serving/bin/python`), where
FleetLens itself is not installed, so this file imports only the standard library, torch,
transformers and tokenizers.

Why a lookup table: every answer is either right or wrong, so an eval of a quantized variant
measures a real quality loss instead of a vibe. Two slices make size and precision matter:

* easy: few facts, seen often (20% of training samples) -- every model learns them;
* hard: many facts, each seen rarely -- only the large model has the capacity to hold them, and
  coarse weight quantization (int3) visibly forgets some.

Output (all under --out):
  tokenizer/                       character-level HF fast tokenizer (also copied into every checkpoint)
  <model>/                         one HF checkpoint per model: small, large, large-bf16, large-int8, ...
  eval/lookup_{easy,hard}.jsonl    {"prompt": "qzk=", "answer": "7fa2"}
  manifest.json                    params, variant, accuracy per slice, train seconds, file hashes

Progress goes to stdout as one JSON object per line (`{"event": "step", ...}`); anything else
(library warnings) goes to stderr, so the parent can parse stdout line by line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
KEY_CHARS = string.ascii_lowercase
VALUE_CHARS = string.ascii_lowercase + string.digits
KEY_LEN = 3
VALUE_LEN = 4
MAX_POSITIONS = 2048  # long English prompts from a load generator must fit (vLLM --max-model-len)
EASY_SHARE = 0.2

# The chat endpoint must put the same tokens in front of the model as the completion endpoint:
# `<s>` + the last user message, nothing else (no role markers the model never saw).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set user = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{%- if user %}{{ user[-1]['content'] }}{% endif -%}"
)


@dataclass(frozen=True)
class Architecture:
    """A Llama shape; head_dim = hidden / heads must be >= 32 for vLLM's CPU attention backend."""

    layers: int
    hidden: int
    heads: int
    intermediate: int


ARCHITECTURES = {
    "small": Architecture(layers=2, hidden=64, heads=2, intermediate=128),
    "large": Architecture(layers=4, hidden=128, heads=4, intermediate=384),
}

# Derived from "large": the variant name is the precision label of models.yaml (bits for intN).
QUANT_BITS = {"int8": 8, "int4": 4, "int3": 3}


def emit(event: str, **fields: Any) -> None:
    """One progress line on stdout, flushed so the parent's progress bar moves in real time."""
    print(json.dumps({"event": event, **fields}), flush=True)


# --------------------------------------------------------------------------- tokenizer and data


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII, so any English prompt tokenizes.

    A BPE model with single characters as its vocabulary and no merges is exactly character-level
    in the `tokenizers` library; `Fuse` decodes by concatenation (no spaces between characters).
    Non-ASCII characters become `<unk>`. The post-processor prepends `<s>` as training did.
    """
    specials = [BOS, EOS, UNK, PAD]
    vocab = {token: index for index, token in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_facts(seed: int, easy: int, hard: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic distinct keys with random values; the first `easy` are the easy slice."""
    rng = random.Random(seed)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < easy + hard:
        key = "".join(rng.choices(KEY_CHARS, k=KEY_LEN))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    facts = [(key, "".join(rng.choices(VALUE_CHARS, k=VALUE_LEN))) for key in keys]
    return facts[:easy], facts[easy:]


def encode_facts(
    tokenizer: PreTrainedTokenizerFast, facts: list[tuple[str, str]]
) -> tuple[torch.Tensor, int]:
    """`<s>key=value</s>` as one row per fact (all the same length), and the prompt length."""
    rows = [tokenizer(f"{key}=")["input_ids"] + tokenizer(value, add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for key, value in facts]
    return torch.tensor(rows), len(tokenizer(f"{facts[0][0]}=")["input_ids"])


# --------------------------------------------------------------------------- training


def new_model(arch: Architecture, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.heads,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def train(name: str, model: LlamaForCausalLM, easy: torch.Tensor, hard: torch.Tensor, prompt_len: int,
          steps: int, batch: int, lr: float, seed: int) -> float:
    """Causal-LM training on value tokens only (keys are random: predicting them is noise).

    Each batch draws EASY_SHARE of its rows from the easy facts, the rest from the hard ones, so an
    easy fact is seen (hard/easy) / 4 times as often as a hard one (15x by default). Returns wall seconds.
    """
    generator = torch.Generator().manual_seed(seed)
    # Memorising random facts starts with a loss plateau that lr 1e-3 with beta2 = 0.999 and no clipping
    # left only by chance (1% or 99% hard accuracy depending on thread count); beta2 = 0.95 and gradient
    # clipping (the usual LM settings) leave it within ~300 steps for the seeds tried (0, 1), and the
    # cosine decay then settles the last facts (a constant lr stalls at ~90%).
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 20),
                                               num_training_steps=steps)
    n_easy = round(batch * EASY_SHARE)
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.cat([
            easy[torch.randint(len(easy), (n_easy,), generator=generator)],
            hard[torch.randint(len(hard), (batch - n_easy,), generator=generator)],
        ])
        labels = rows.clone()
        labels[:, :prompt_len] = -100
        loss = model(input_ids=rows, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps:
            emit("step", model=name, step=step, steps=steps, loss=round(loss.item(), 4))
    model.eval()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- variants and evaluation


@torch.no_grad()
def fake_quantize(model: LlamaForCausalLM, bits: int) -> None:
    """Per-output-channel symmetric round trip of every Linear weight, in place.

    scale = max|w| of the row / (2^(bits-1) - 1); the weights stay fp32 but take only 2^bits - 1
    distinct values per row, i.e. what an intN weight-only kernel would compute with.
    """
    qmax = 2 ** (bits - 1) - 1
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            scale = (weight.abs().amax(dim=1) / qmax).clamp(min=torch.finfo(weight.dtype).tiny)
            zero = torch.zeros(weight.shape[0], dtype=torch.int32)
            weight.copy_(torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -qmax, qmax))


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, rows: torch.Tensor, prompt_len: int, batch: int = 512) -> float:
    """Exact match with greedy decoding: the whole value and then `</s>`, nothing else."""
    correct = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        prompts = chunk[:, :prompt_len]
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                             max_new_tokens=chunk.shape[1] - prompt_len, min_new_tokens=0)
        generated = out[:, prompt_len:]
        if generated.shape[1] < chunk.shape[1] - prompt_len:  # every row stopped early: all wrong
            continue
        correct += int((generated == chunk[:, prompt_len:]).all(dim=1).sum())
    return correct / len(rows)


def file_hashes(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir()) if path.is_file()}


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """A self-contained checkpoint vLLM can serve: weights, config, tokenizer with chat template."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json with the chat template inside (not a .jinja file).

    The class is recorded as `PreTrainedTokenizerFast` (transformers 5 writes its new name,
    `TokenizersBackend`, which transformers 4 cannot load) so older consumers can read it too.
    """
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Params:
    """Everything that changes the result; the parent hashes these (with this file) as cache key."""

    seed: int = 0
    easy_facts: int = 50
    hard_facts: int = 3000
    small_steps: int = 600
    large_steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3


def parse_args(argv: list[str]) -> tuple[Params, Path, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    for field, default in asdict(Params()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    out, threads = args.pop("out"), args.pop("threads")
    return Params(**args), out, threads


def main(argv: list[str]) -> None:
    params, out, threads = parse_args(argv)
    hf_logging.disable_progress_bar()  # stderr is for problems; progress is the JSON lines
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(params.seed)
    out.mkdir(parents=True, exist_ok=True)
    emit("start", params=asdict(params), threads=threads, torch=torch.__version__)

    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, out / "tokenizer")
    easy_facts, hard_facts = make_facts(params.seed, params.easy_facts, params.hard_facts)
    (out / "eval").mkdir(exist_ok=True)
    for slice_name, facts in (("easy", easy_facts), ("hard", hard_facts)):
        with open(out / "eval" / f"lookup_{slice_name}.jsonl", "w") as file:
            for key, value in facts:
                file.write(json.dumps({"prompt": f"{key}=", "answer": value}) + "\n")
    easy, prompt_len = encode_facts(tokenizer, easy_facts)
    hard, _ = encode_facts(tokenizer, hard_facts)

    checkpoints: dict[str, dict[str, Any]] = {}
    trained: dict[str, LlamaForCausalLM] = {}
    for name, arch in ARCHITECTURES.items():
        torch.manual_seed(params.seed)
        model = new_model(arch, tokenizer)
        steps = params.small_steps if name == "small" else params.large_steps
        seconds = train(name, model, easy, hard, prompt_len, steps, params.batch_size, params.lr, params.seed)
        save(model, tokenizer, out / name)
        trained[name] = model
        checkpoints[name] = {"variant": "fp32", "base": None, "architecture": asdict(arch),
                             "params": model.num_parameters(), "train_seconds": round(seconds, 1),
                             "dtype": "float32"}

    for variant in ("bf16", *QUANT_BITS):
        model = new_model(ARCHITECTURES["large"], tokenizer)
        model.load_state_dict(trained["large"].state_dict())
        if variant == "bf16":
            model.to(torch.bfloat16)  # non-persistent RoPE inv_freq is not saved; reload keeps it fp32
        else:
            fake_quantize(model, QUANT_BITS[variant])
        save(model, tokenizer, out / f"large-{variant}")
        checkpoints[f"large-{variant}"] = {
            "variant": variant, "base": "large", "architecture": asdict(ARCHITECTURES["large"]),
            "params": model.num_parameters(), "train_seconds": 0.0,
            "dtype": "bfloat16" if variant == "bf16" else "float32",
        }

    # Evaluate what was written, reloaded as a consumer loads it, not the in-memory objects.
    for name, entry in checkpoints.items():
        model = LlamaForCausalLM.from_pretrained(out / name, dtype=getattr(torch, entry["dtype"]))
        entry["accuracy"] = {"easy": accuracy(model, easy, prompt_len),
                             "hard": accuracy(model, hard, prompt_len)}
        entry["files"] = file_hashes(out / name)
        emit("eval", model=name, variant=entry["variant"], **entry["accuracy"])

    manifest = {"task": "lookup", "params": asdict(params), "threads": threads, "torch": torch.__version__,
                "key_len": KEY_LEN, "value_len": VALUE_LEN, "max_model_len": MAX_POSITIONS,
                "eval": {"easy": "eval/lookup_easy.jsonl", "hard": "eval/lookup_hard.jsonl"},
                "models": checkpoints}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    emit("done", manifest="manifest.json")


if __name__ == "__main__":
    main(sys.argv[1:])
