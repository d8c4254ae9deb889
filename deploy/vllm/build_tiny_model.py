"""Builds the tiny random model the vLLM drills serve, offline, into one directory.

- ``LlamaForCausalLM``: hidden 128, 2 layers, 2 heads, head_dim 64, max_position_embeddings
  32768, bf16, random weights from a fixed seed, saved with ``save_pretrained``.
- A 1024-token BPE tokenizer trained with the ``tokenizers`` library on Python's own
  standard-library sources, restricted to printable ASCII, with a Metaspace pre-tokenizer: a
  byte-level BPE would let a random model emit broken UTF-8, which makes SSE text useless.
- A small chat template, so ``/v1/chat/completions`` works.

Every worker must serve the SAME files (build once, point all servers at it): the drills then
know that two workers give the same text for the same prompt, so they detect a splice by the
SSE ``id`` of each chunk and Envoy's ``%UPSTREAM_HOST%``, never by text.

Run with the vLLM virtual environment's Python (it has torch, transformers, tokenizers).
A ``.gpuha-model-ok`` file is written last: its presence means the directory is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
import sysconfig
import time
from pathlib import Path

MARKER = ".gpuha-model-ok"
VOCAB = 1024
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' }}{{ m['content'] if m['content'] is string else '' }}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
PRINTABLE = set(string.printable) - {"\x0b", "\x0c", "\r"}


def corpus(limit_bytes: int = 8 << 20):
    """Python stdlib sources (sorted, so the corpus is the same on every run), printable ASCII only."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "test" in p.parts:
            continue
        try:
            text = p.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        text = "".join(c for c in text if c in PRINTABLE)
        total += len(text)
        yield text
        if total >= limit_bytes:
            return


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=sorted(PRINTABLE - {" "}))
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 32768
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tok, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=32768,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg.dtype = "bfloat16"  # transformers 5 name (torch_dtype is deprecated)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    a = ap.parse_args()
    if (a.out / MARKER).exists() and not a.force:
        print(f"tiny model already built in {a.out}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / MARKER).unlink(missing_ok=True)
    tok = build_tokenizer(a.out)
    build_model(a.out, tok, a.seed)
    # Sanity: the tokenizer round-trips printable ASCII and the template renders.
    sample = "def f(x):\n    return x + 1"
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample, "tokenizer does not round-trip"
    tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    (a.out / MARKER).write_text(json.dumps({"seed": a.seed, "vocab": VOCAB, "built_s": round(time.monotonic() - t0, 1)}))
    print(f"tiny model built in {a.out} in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
