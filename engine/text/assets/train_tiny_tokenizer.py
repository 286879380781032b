"""Train the tiny demo tokenizer (tiny_tokenizer.model) from tiny_corpus.txt.

The model copies ChatGLM3's tokenizer settings at a toy size, so code and tests exercise the same layout as the
real model: <unk> <s> </s> at 0..2, byte-fallback pieces <0x00>..<0xFF> at 3..258, dummy prefix on, whitespace
kept, digits split, no normalization. 2000 pieces plus the nine special tokens stay below the 4096-row
vocabulary of the ``glm-tiny`` preset.

Training is deterministic (one thread, fixed seed, no sampling or shuffling, sentences fed from memory so no
file path is recorded in the model): rerunning this script reproduces the shipped model.

    python engine/text/assets/train_tiny_tokenizer.py [--output PATH]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "tiny_corpus.txt"
MODEL = HERE / "tiny_tokenizer.model"
SEED = 20240613

TRAINER_OPTIONS = dict(
    model_type="unigram",
    vocab_size=2000,
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    character_coverage=0.9995,  # rare characters and emoji are left to byte fallback, as in the real model
    max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    num_threads=1,
    shuffle_input_sentence=False,
    input_sentence_size=0,
    minloglevel=2,
)


def train(corpus: Path = CORPUS) -> bytes:
    """The serialized model trained on ``corpus`` (one sentence per non-empty line)."""
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    spm.set_random_generator_seed(SEED)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, **TRAINER_OPTIONS)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=MODEL, help=f"where to write the model (default {MODEL})")
    args = parser.parse_args()
    data = train()
    args.output.write_bytes(data)
    print(f"wrote {args.output} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
