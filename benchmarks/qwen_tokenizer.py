"""Qwen3's tokenizer, rebuilt from the BPE ranks that a PyPI wheel ships, for the benchmarks.

The model folders in benchmarks/models hold only a config (dummy weights), and the Hugging Face
hub is out of reach; PyPI is not. dashscope==2.0.2 ships dashscope/resources/qwen.tiktoken: Qwen's
byte-level BPE ranks, 151,643 tokens, the regular vocabulary of Qwen2, Qwen2.5 and Qwen3. This
script makes a Hugging Face fast tokenizer folder of them (tokenizer.json, tokenizer_config.json):
transformers' Qwen2Tokenizer (NFC, Qwen2's split regex, byte-level BPE) on the ranks and the merges
its tiktoken converter derives, plus Qwen3's 26 added tokens at their ids (151643-151668), eos
<|im_end|>, pad <|endoftext|>. Benchmarks of structured outputs need the real vocabulary: xgrammar's
bitmask fill costs time per token.

  python benchmarks/qwen_tokenizer.py                 # pip downloads the wheel (2.4 MB) to a temp dir
  python benchmarks/qwen_tokenizer.py --wheel /tmp/dl/dashscope-2.0.2-py3-none-any.whl --out DIR
  make qwen-tokenizer                                 # the same, into benchmarks/tokenizers/qwen3
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "dashscope==2.0.2"
RANKS = "dashscope/resources/qwen.tiktoken"
DEFAULT_OUT = Path(__file__).resolve().parent / "tokenizers" / "qwen3"
CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "aio_engine" / "default_model" / "chat_template.jinja"
# Qwen3's added tokens, in id order from 151643: first the special ones (skipped when decoding)...
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# ...then the ones Qwen3's tokenizer_config marks "special": false, which decode as text.
TEXT = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
VOCAB_SIZE = 151669  # len(tokenizer); Qwen3's lm_head has 151936 rows, the rest is padding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help=f"a local {WHEEL} wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen-tokenizer-") as scratch:
        wheel = args.wheel or download(Path(scratch))
        tokenizer = build(wheel, args.out)
    print(f"wrote {args.out}: {len(tokenizer)} tokens, eos {tokenizer.eos_token} ({tokenizer.eos_token_id})")


def download(folder: Path) -> Path:
    """pip download the wheel, without its dependencies, into folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), WHEEL], check=True)
    return next(folder.glob("dashscope-*.whl"))


def read_ranks(wheel: Path) -> dict[bytes, int]:
    """qwen.tiktoken, read from the wheel: one `base64(token bytes) rank` per line."""
    with zipfile.ZipFile(wheel) as archive:
        lines = archive.read(RANKS).splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def build(wheel: Path, out: Path):
    """Write the tokenizer folder `out` from the wheel's ranks; returns the tokenizer."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    ranks = read_ranks(wheel)
    converter = TikTokenConverter()
    converter.load_tiktoken_bpe = lambda _: ranks  # read already (its own reader needs the tiktoken package)
    vocab, merges = converter.extract_vocab_merges_from_model(None)
    # Adds <|endoftext|> (unk, eos and pad for now) at the next id, 151643.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)
    tokenizer.add_special_tokens({"extra_special_tokens": SPECIAL[1:]})
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in TEXT])
    tokenizer.eos_token, tokenizer.unk_token = "<|im_end|>", None
    tokenizer.chat_template = CHAT_TEMPLATE.read_text()  # the embedded model's ChatML (no thinking, no tools)
    ids = tokenizer.convert_tokens_to_ids(SPECIAL + TEXT)
    if ids != list(range(VOCAB_SIZE - len(ids), VOCAB_SIZE)) or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the added tokens did not land at their ids: {ids}, {len(tokenizer)} tokens")
    tokenizer.save_pretrained(out)
    return tokenizer


if __name__ == "__main__":
    main()
