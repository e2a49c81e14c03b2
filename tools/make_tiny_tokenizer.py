"""Regenerate ``qlora_kit/resources/tiny-demo``: a byte-level BPE tokenizer trained on the built-in quotes,
and the ``config.json`` of a tiny Llama-style model that matches it.

    python tools/make_tiny_tokenizer.py                 # rewrite the committed files
    python tools/make_tiny_tokenizer.py --out /tmp/x    # write elsewhere (tests compare the bytes)

Deterministic: the same quotes give byte-identical files (single-threaded training, sorted JSON, no
version strings). ``transformers.AutoTokenizer.from_pretrained(dir)`` loads the result as a
``PreTrainedTokenizerFast``; ``AutoConfig.from_pretrained(dir)`` the model config. Only ``tokenizers``
is imported here, so the script runs in about a second.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

# tokenizers trains with a thread pool; one thread keeps merge ties in a fixed order
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
QUOTES = ROOT / "qlora_kit" / "resources" / "quotes.jsonl"
OUT = ROOT / "qlora_kit" / "resources" / "tiny-demo"

VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL = (BOS, EOS, PAD, *ROLES)  # ids 0..5 in this order
MAX_POSITIONS = 256

# Each turn is "<|role|>\n" + content + eos; the generation prompt is "<|assistant|>\n". Rendering a
# prefix of a conversation gives a prefix of the full text, which is what data.py's label masking needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def corpus(quotes: Path) -> list[str]:
    """The training text: every quote, and every author once (in file order)."""
    rows = [json.loads(line) for line in quotes.read_text(encoding="utf-8").splitlines() if line.strip()]
    authors = list(dict.fromkeys(r["author"] for r in rows))
    return [r["quote"] for r in rows] + authors


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Llama-style: a bos in front of every encoded text; eos is the data pipeline's to add
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def model_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """A tiny Llama (3.4 M parameters: hidden 256, 4 layers, untied head) for tests and the demo recipe."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": -(-vocab_size // 64) * 64,
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out: Path, quotes: Path = QUOTES) -> list[Path]:
    """Train on ``quotes`` and write the four files into ``out``; returns their paths."""
    tok = train_tokenizer(corpus(quotes))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    assert list(ids.values()) == list(range(len(SPECIAL))), ids
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    _dump(out / "special_tokens_map.json", special_map)
    _dump(
        out / "tokenizer_config.json",
        {
            **special_map,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _dump(out / "config.json", model_config(tok.get_vocab_size(), ids))
    return [out / n for n in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json", "config.json")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--quotes", type=Path, default=QUOTES, help="training text, one JSON quote per line")
    args = parser.parse_args()
    for path in build(args.out, args.quotes):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
