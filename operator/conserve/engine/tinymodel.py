"""Build a tiny Llama-architecture model locally: random weights, a byte-level BPE tokenizer, a chat template.

No model hub is ever contacted: the weights are drawn from a seeded generator and the tokenizer is trained on
text generated here. The engine loads it through its ordinary path (a Hugging Face folder). It runs with the
engine's Python (it needs torch, transformers and tokenizers, which the project's environment lacks):

    <engine venv>/bin/python operator/conserve/engine/tinymodel.py OUT_DIR

``conserve engine model`` does that and caches the folder by this file's ``MODEL_VERSION``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

#: Bump when anything below changes, so cached folders are rebuilt.
MODEL_VERSION = 1
SEED = 20261130
VOCAB_SIZE = 2048
MAX_POSITIONS = 4096
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message is closed by <|end|>, which is also the end-of-sequence token: a rendered history is a prefix of
# the next turn's rendering, so the engine's prefix cache can hit across turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORD_TEXT = (
    "the a of to and in is it that for on with as was at by be this from or have an they which one you had "
    "not but what all were when we there can more if no out so said up its about into than them time only "
    "conversation turn decoder prefill cache token block transfer energy power node pool router operator "
    "tok kubernetes serving model request stream latency first effective answer question"
)


def corpus(lines: int, rng: random.Random) -> list[str]:
    """Generated text: word salad with digits and punctuation, enough for a byte-level BPE to learn merges."""
    vocabulary = _WORD_TEXT.split()
    out = []
    for _ in range(lines):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 30))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ""]))
    return out


def build(out_dir: Path) -> dict[str, Any]:
    """Write the model and tokenizer to ``out_dir``; returns a summary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(4000, rng), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    summary = {
        "model_version": MODEL_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
    }
    (out_dir / "conserve-model.json").write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    print(json.dumps(build(Path(sys.argv[1]))))
