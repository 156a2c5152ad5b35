"""`aio-engine serve --help` in vLLM's forms.

--help               usage and the list of groups
--help=all           every flag, by group
--help=listgroup     the groups, each with a line on what it holds
--help=<Group>       one group (ModelConfig, or its short name: model, cache, frontend, ...)
--help=<flag>        one flag (max-num-seqs, --max-num-seqs, max_num_seqs, -O)
--help=<keyword>     flags whose name (or else help) mentions the keyword
--help=page          everything, through a pager
"""

from __future__ import annotations

import argparse
import pydoc
import shutil
import textwrap

from .flags import GROUP_TITLES

JSON_TIP = """\
JSON arguments (-cc, --hf-overrides, -so, --override-generation-config, ...): these are the same
   --json-arg '{"key1": "value1", "key2": {"key3": "value2"}}'
   --json-arg.key1 value1 --json-arg.key2.key3 value2
and list items can be appended one by one with +:
   --json-arg '{"key4": [1, 2, 3]}'
   --json-arg.key4+ 1 --json-arg.key4+=2,3
"""
TIPS = """\
Use --help=<ConfigGroup> to explore the flags:
   --help=listgroup      the groups
   --help=ModelConfig    one group
   --help=max-num-seqs   one flag
   --help=max            flags matching a keyword
   --help=all            every flag;  --help=page: every flag through a pager
A --config FILE.yaml holds flags as keys; the command line wins over it."""


class SummaryHelpAction(argparse.Action):
    """-h/--help: usage and the groups (vLLM's short help)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(summary_help(parser))
        parser.exit()


def _groups(parser: argparse.ArgumentParser) -> list[argparse._ArgumentGroup]:
    hidden = ("options", "optional arguments", "positional arguments")
    return [g for g in parser._action_groups if g._group_actions and g.title not in hidden]


def summary_help(parser: argparse.ArgumentParser) -> str:
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    formatter.add_text(parser.description)
    text = formatter.format_help()
    return text + "\n" + group_list(parser) + "\n" + TIPS


def group_list(parser: argparse.ArgumentParser) -> str:
    groups = _groups(parser)
    width = max(len(g.title) for g in groups) + 2
    columns = max(shutil.get_terminal_size().columns - 2, width + 40)
    lines = ["Config groups:"]
    for g in groups:
        lines += textwrap.wrap(g.description or "", columns, initial_indent=f"  {g.title:<{width}}",
                               subsequent_indent=" " * (width + 2)) or [f"  {g.title}"]
    return "\n".join(lines) + "\n"


def full_help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help() + "\n" + JSON_TIP


def _section(parser: argparse.ArgumentParser, title: str, description: str | None, actions) -> str:
    formatter = parser._get_formatter()
    formatter.start_section(title)
    formatter.add_text(description)
    formatter.add_arguments(actions)
    formatter.end_section()
    return formatter.format_help()


def help_text(parser: argparse.ArgumentParser, keyword: str) -> tuple[str, int]:
    """(text, exit status) of `--help=<keyword>`."""
    word = keyword.strip()
    lower = word.lower()
    if lower == "all":
        return full_help(parser), 0
    if lower == "listgroup":
        return group_list(parser), 0
    aliases = {key: title for key, title in GROUP_TITLES.items()}
    for group in _groups(parser):
        short = [key for key, title in aliases.items() if title == group.title]
        if lower in (group.title.lower(), *short, group.title.lower().removesuffix("config")):
            return _section(parser, group.title, group.description, group._group_actions) + "\n" + JSON_TIP, 0
    actions = [a for g in _groups(parser) for a in g._group_actions]
    for name in (word, word.replace("_", "-")):
        for flag in (name, "--" + name.lstrip("-"), "-" + name.lstrip("-")):
            exact = [a for a in actions if flag in a.option_strings]
            if exact:
                return _section(parser, f"Argument {flag}", None, exact), 0
    term = lower.replace("_", "-").lstrip("-")
    found = [a for a in actions if any(term in s.lower() for s in a.option_strings)]
    found += [a for a in actions if a not in found and term.replace("-", " ") in (a.help or "").lower().replace("-", " ")]
    if found:
        return _section(parser, f"Arguments matching {keyword!r}", None, found), 0
    return (f"No group or argument matching {keyword!r}.\n"
            "Use --help=listgroup to list the groups, or --help=all to see every flag.\n"), 1


def show_help(parser: argparse.ArgumentParser, keyword: str) -> int:
    """Print (or page) the help `--help=<keyword>` asks for; the exit status."""
    if keyword.strip().lower() == "page":
        pydoc.pager(full_help(parser))
        return 0
    text, status = help_text(parser, keyword)
    print(text, end="" if text.endswith("\n") else "\n")
    return status
