"""The command line before argparse sees it: --config files, underscores, JSON arguments.

- `--max_model_len` is `--max-model-len` (underscores in flag names become dashes).
- `--config FILE.yaml`: its keys (flag names, dashes or underscores) become flags placed before
  the command line's own, so that the command line wins; an unknown key is an error naming it.
- JSON arguments (-cc, --hf-overrides, ...): `--x '{"a": {"b": 1}}'` equals `--x.a.b 1`;
  `--x.key+ v` and `--x.key+=v1,v2` append to a list. Every fragment of one argument (config
  file first, then the command line, left to right) is merged into one JSON object, later
  fragments winning key by key; values are parsed as JSON where they parse, else kept as text.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .flags import NotSupportedAction, json_object

_NUMBER = re.compile(r"-\d")


def expand_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` (after the subcommand) rewritten into plain flags for `parser`."""
    argv = [_dashes(a) for a in argv]
    argv = _with_config_file(parser, argv)
    return _merge_json_args(parser, argv)


def _dashes(arg: str) -> str:
    """--max_model_len=8k -> --max-model-len=8k; JSON sub-keys (after a dot) keep their underscores."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg.partition("=")
    base, dot, keys = name.partition(".")
    return base.replace("_", "-") + dot + keys + eq + value


def _is_json(action: argparse.Action | None) -> bool:
    return action is not None and action.type is json_object


# --- --config FILE.yaml ---
def _with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    found = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not found:
        return argv
    if len(found) > 1:
        parser.error("--config is given more than once")
    i = found[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv):
            parser.error("argument --config: expected a YAML file")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1:]
    tokens = config_file_args(parser, path)
    # After a leading positional MODEL (so that a list flag of the file cannot swallow it), which
    # then wins over the file's `model`.
    head = 1 if rest and not rest[0].startswith("-") else 0
    if head:
        tokens = [t for t in tokens if not t.startswith("--model=")]
    return rest[:head] + tokens + rest[head:]


def config_file_args(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The flags a YAML config file stands for, in its order."""
    import yaml

    file = Path(path)
    if file.suffix not in (".yaml", ".yml"):
        parser.error(f"--config {path}: the config file must be .yaml or .yml")
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as e:
        parser.error(f"--config {path}: cannot read it: {e.strerror}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML: {e}")
    if data is None:
        return []
    if not isinstance(data, dict):
        parser.error(f"--config {path}: must be a mapping of flag names to values")
    actions = parser._option_string_actions
    tokens: list[str] = []
    for key, value in data.items():
        name = str(key).replace("_", "-").lstrip("-")
        flag = next((f for f in ("--" + name, "-" + name) if f in actions), None)
        if flag is None or flag == "--config" or (name.startswith("no-") and "--" + name[3:] in actions):
            parser.error(f"--config {path}: unknown key {key!r} (keys are flag names, e.g. max-model-len)")
        tokens += _config_value(parser, actions[flag], flag, value)
    return tokens


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, flag: str, value) -> list[str]:
    if value is None:
        return []
    if action.nargs == 0:  # booleans: --x / --no-x, store_false / store_const flags
        if not isinstance(value, bool):
            parser.error(f"--config: key {flag.lstrip('-')!r} takes true or false, got {value!r}")
        negative = "--no-" + flag[2:]
        if value:
            return [flag]
        return [negative] if negative in action.option_strings else []
    if _is_json(action):
        return [flag, value if isinstance(value, str) else json.dumps(value)]
    if isinstance(value, list):
        return [flag, *map(_text, value)] if value else []
    return [f"{flag}={_text(value)}"]


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


# --- JSON arguments ---
def _merge_json_args(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    actions = parser._option_string_actions
    merged: dict[str, dict] = {}  # dest -> the merged object
    out: list[str | tuple[str, str]] = []  # a tuple marks where a JSON argument's merged value goes
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out += argv[i - 1:]
            break
        if not arg.startswith("-") or _NUMBER.match(arg):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        base, dot, path = name.partition(".")
        append = name.endswith("+")
        if append and not dot:
            base = base[:-1]
        action = actions.get(base)
        if not _is_json(action):
            if dot and isinstance(action, NotSupportedAction):
                action(parser, None, [value] if eq else [], base)
            if dot and action is not None:
                parser.error(f"argument {base}: not a JSON argument, so {name} is not a valid form")
            out.append(arg)
            continue
        if not eq:
            if i >= len(argv):
                parser.error(f"argument {name}: expected one argument")
            value = argv[i]
            i += 1
        keys = path.removesuffix("+").split(".") if dot else []
        if append and not keys:
            parser.error(f"argument {name}: '+' appends to a list inside the JSON object, e.g. {base}.key+ value")
        if dot and any(not k for k in keys):
            parser.error(f"argument {name}: empty key")
        if action.dest not in merged:
            merged[action.dest] = {}
            out.append((action.option_strings[0], action.dest))
        target = merged[action.dest]
        try:
            if not keys:
                _deep_update(target, json_object(value))
            elif append:
                _append(target, keys, value)
            else:
                _set(target, keys, _json_or_text(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"argument {name}: {e}")
    result: list[str] = []
    for item in out:
        if isinstance(item, tuple):
            result += [item[0], json.dumps(merged[item[1]])]
        else:
            result.append(item)
    return result


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _parent(target: dict, keys: list[str]) -> dict:
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    return target


def _set(target: dict, keys: list[str], value) -> None:
    _parent(target, keys)[keys[-1]] = value


def _append(target: dict, keys: list[str], text: str) -> None:
    parent = _parent(target, keys)
    whole = _json_or_text(text)
    items = whole if isinstance(whole, list) else [_json_or_text(part) for part in text.split(",")]
    current = parent.setdefault(keys[-1], [])
    if not isinstance(current, list):
        raise ValueError(f"'+' appends to a list, but {'.'.join(keys)} is {current!r}")
    current.extend(items)
