"""What the benchmark scripts share: percentiles, writing results (--json / --jsonl), the machine.

Each script prints a table and one JSON line; `--json PATH` writes that document, `--jsonl PATH`
appends it as one line tagged with the benchmark's name, so that a whole GPU session fits in one
file (benchmarks/suite.sh) and benchmarks/plots.py can read it back.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
from pathlib import Path


def percentiles(values: list[float], scale: float = 1.0, digits: int = 2) -> dict:
    """mean, p50, p90, p99 (nearest rank) of `values` times `scale`; None for an empty list."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": round(statistics.fmean(values) * scale, digits), "p50": round(rank(0.50) * scale, digits),
            "p90": round(rank(0.90) * scale, digits), "p99": round(rank(0.99) * scale, digits)}


def machine() -> dict:
    """The device and library versions a figure was measured with."""
    info = {"date": datetime.date.today().isoformat(), "host_cpu": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - a benchmark without torch still reports
        pass
    return info


def emit(bench: str, result: dict, json_path: Path | None = None, jsonl_path: Path | None = None) -> None:
    """Print the result as one JSON line and write it where asked."""
    record = {"bench": bench, **machine(), **result}
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(record, indent=2, default=str))
    if jsonl_path:
        Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl_path, "a") as f:
            f.write(line + "\n")


def read_records(paths: list[Path]) -> list[dict]:
    """Every record of .jsonl files (one per line) and .json files (one document or a list)."""
    records: list[dict] = []
    for path in paths:
        text = Path(path).read_text()
        if str(path).endswith(".jsonl"):
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            doc = json.loads(text)
            records += doc if isinstance(doc, list) else [doc]
    return records


def model_folder(serve_args: list[str]) -> Path | None:
    """The model folder named by `--model X`, `--model=X` or the positional MODEL of serve flags."""
    for i, arg in enumerate(serve_args):
        if arg == "--model" and i + 1 < len(serve_args):
            return Path(serve_args[i + 1])
        if arg.startswith("--model="):
            return Path(arg.split("=", 1)[1])
    if serve_args and not serve_args[0].startswith("-"):
        return Path(serve_args[0])
    return None


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def word_level_tokenizer(vocab_size: int, folder: Path) -> Path:
    """A fast tokenizer where every id in [0, vocab_size) is a word "w<id>" (decoded " w<id>").

    For config-only model folders (benchmarks/models): random weights sample ids all over the
    vocabulary, and a real but smaller tokenizer decodes most of them to nothing, so a server
    would stream no text. Detokenizing costs about what a real tokenizer's does.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}))
    return folder
