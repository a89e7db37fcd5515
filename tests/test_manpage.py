"""docs/hbd.1 must keep up with the code: every config key (nested ones too), every subcommand and
option, and it must render without groff warnings.

The man page is read as roff, not as plain text: a key counts as documented only where the page sets
it in bold as the tag of an entry (``.TP`` + ``.B key``) in the right section, so a passing mention
of ``host`` elsewhere does not hide a missing entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hbd.cli import build_parser
from hbd.config import ClientConfig, ServerConfig

MANPAGE = Path(__file__).resolve().parents[1] / "docs" / "hbd.1"
SECTIONS = {ServerConfig: "Server keys", ClientConfig: "Client keys"}  # .SS titles under CONFIGURATION

# -- a little roff: enough to tell which words a line sets in bold -----------------------------------
_ESCAPES = {
    r"\-": "-",
    r"\(rs": "\\",
    r"\(dq": '"',
    r"\(aq": "'",
    r"\(mu": "x",
    r"\(en": "-",
    r"\&": "",
    r"\c": "",
    r"\e": "\\",
    r"\|": "",
    r"\^": "",
}
_FONT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI"}
_WORD = re.compile(r"-{0,2}[A-Za-z0-9_%][A-Za-z0-9_.%-]*")


def _arguments(text: str) -> list[str]:
    """A macro's arguments: split at spaces, except inside double quotes ("" is a quote character)."""
    args = re.findall(r'"((?:[^"]|"")*)"?|(\S+)', text)
    return [quoted.replace('""', '"') if quoted or not plain else plain for quoted, plain in args]


def _bold_text(line: str) -> str:
    """The text a roff line sets in bold, with spaces between separate runs."""
    if line.startswith("."):
        name, _, rest = line[1:].partition(" ")
        if name not in _FONT_MACROS:
            return ""
        args = _arguments(rest)
        fonts = (name * len(args))[: len(args)]  # .BR: bold, roman, bold, ...; .B: all bold
        return " ".join(_inline_bold(arg, font) for arg, font in zip(args, fonts, strict=True))
    return _inline_bold(line, "R")


def _inline_bold(text: str, font: str) -> str:
    r"""Follow \fB, \fI, \fR and \fP (back to the previous font) through ``text`` starting in ``font``."""
    out, previous = [], font
    for i, piece in enumerate(re.split(r"\\f([BIRP])", text)):
        if i % 2:
            font, previous = (previous, font) if piece == "P" else (piece, font)
        elif font == "B":
            out.append(piece)
    return " ".join(out)


def _words(bold: str) -> list[str]:
    for escape, char in _ESCAPES.items():
        bold = bold.replace(escape, char)
    return [w.rstrip(".-") for w in _WORD.findall(bold)]


@dataclass
class Entry:
    """One ``.TP`` item: its tag words (bold, including ``.TQ`` tags) and the items nested in it."""

    section: str
    subsection: str
    tags: set[str]
    children: list[Entry] = field(default_factory=list)


@dataclass
class ManPage:
    entries: list[Entry]  # top-level items (inside no .RS), in order
    synopsis: list[list[str]]  # the bold words of each synopsis line (between .br), in order

    def synopsis_of(self, command: str) -> list[str]:
        """The bold words of the synopsis line ``hbd COMMAND ...``."""
        return next((line for line in self.synopsis if line[:2] == ["hbd", command]), [])

    def options_of(self, command: str) -> set[str]:
        """Tags of OPTIONS entries in a subsection whose title names the command."""
        return set().union(
            *(e.tags for e in self.entries if e.section == "OPTIONS" and command in e.subsection.split())
        )


def parse(text: str) -> ManPage:
    entries: list[Entry] = []
    synopsis: list[list[str]] = []
    section = subsection = ""
    depth = 0
    open_at: dict[int, Entry] = {}  # the current item at each .RS depth
    tag_next = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"")):
            continue
        macro = line[1:].split(" ", 1)[0] if line.startswith(".") else ""
        if macro in ("SH", "SS"):
            title = " ".join(_arguments(line[3:].replace("\\-", "-")))
            section, subsection = (title, "") if macro == "SH" else (section, title)
            open_at.clear()
            depth = 0
            if title == "SYNOPSIS":
                synopsis.append([])
            continue
        if macro == "RS":
            depth += 1
            continue
        if macro == "RE":
            open_at = {d: e for d, e in open_at.items() if d < depth}
            depth = max(depth - 1, 0)
            continue
        if macro in ("TP", "TQ"):
            if macro == "TP":
                entry = Entry(section, subsection, set())
                if depth and depth - 1 in open_at:
                    open_at[depth - 1].children.append(entry)
                elif not depth:
                    entries.append(entry)
                open_at = {d: e for d, e in open_at.items() if d < depth}
                open_at[depth] = entry
            tag_next = True
            continue
        if tag_next:
            open_at[depth].tags.update(_words(_bold_text(line)))
            tag_next = False
            continue
        if section == "SYNOPSIS":
            if macro == "br":
                synopsis.append([])
            else:
                synopsis[-1] += _words(_bold_text(line))
    return ManPage(entries, [s for s in synopsis if s])


@pytest.fixture(scope="module")
def page() -> ManPage:
    return parse(MANPAGE.read_text(encoding="utf-8"))


# -- configuration keys --------------------------------------------------------------------------------
def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _nested(cls: type) -> dict[str, type]:
    """Fields whose value is (or holds) another dataclass: field name -> that dataclass."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in _public_fields(cls):
        todo = [hints[f.name]]
        while todo:
            t = todo.pop()
            if dataclasses.is_dataclass(t):
                out[f.name] = t
            elif isinstance(t, types.UnionType) or typing.get_origin(t) is not None:
                todo.extend(typing.get_args(t))
    return out


def _keys(page: ManPage, cls: type) -> list[Entry]:
    return [e for e in page.entries if e.section == "CONFIGURATION" and e.subsection == SECTIONS[cls]]


@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda c: c.__name__)
def test_every_config_key_has_an_entry(page: ManPage, cls: type) -> None:
    documented = set().union(*(e.tags for e in _keys(page, cls)))
    fields = {f.name for f in _public_fields(cls)}
    assert fields <= documented, f"docs/hbd.1, section {SECTIONS[cls]!r}: no entry for {sorted(fields - documented)}"
    assert documented <= fields, (
        f"docs/hbd.1, section {SECTIONS[cls]!r}: entries for keys that {cls.__name__} does not have: "
        f"{sorted(documented - fields)}"
    )


def test_every_nested_key_has_an_entry_under_its_parent(page: ManPage) -> None:
    """tls.* and servers[].*: each key of the nested dataclass is an item inside the parent's entry (in
    the server's or the client's section: the server's tls has no verify, for example)."""
    parents: dict[tuple[str, type], set[str]] = {}
    for cls in SECTIONS:
        for name, inner in _nested(cls).items():
            entries = [e for e in _keys(page, cls) if name in e.tags]
            assert entries, f"docs/hbd.1, section {SECTIONS[cls]!r}: no entry for {name}"
            sub = set().union(*(c.tags for e in entries for c in e.children))
            assert sub, f"docs/hbd.1: the {name} entry of {SECTIONS[cls]!r} lists none of its keys (.RS/.TP)"
            unknown = sub - {f.name for f in _public_fields(inner)}
            assert not unknown, f"docs/hbd.1: {name} in {SECTIONS[cls]!r} documents unknown keys {sorted(unknown)}"
            parents.setdefault((name, inner), set()).update(sub)
    assert parents, "no nested config sections found: has the config changed shape?"
    for (name, inner), documented in parents.items():
        missing = {f.name for f in _public_fields(inner)} - documented
        assert not missing, f"docs/hbd.1: no entry for {name}: {sorted(missing)} ({inner.__name__})"


# -- the command line ----------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _arguments_of(parser: argparse.ArgumentParser) -> tuple[list[list[str]], set[str]]:
    """(the option strings of each option other than --help, the choices of positional arguments)."""
    options, choices = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            options.append(list(action.option_strings))
        elif action.choices:
            choices.update(action.choices)
    return options, choices


def test_every_subcommand_is_in_the_synopsis_and_commands(page: ManPage) -> None:
    subcommands = _subcommands(build_parser())
    assert {"server", "client", "check-config", "status"} <= set(subcommands)
    commands = set().union(*(e.tags for e in page.entries if e.section == "COMMANDS"))
    for name in subcommands:
        assert page.synopsis_of(name), f"docs/hbd.1: SYNOPSIS has no line hbd {name} ..."
        assert name in commands, f"docs/hbd.1: COMMANDS has no entry for {name}"


@pytest.mark.parametrize("name", sorted(_subcommands(build_parser())))
def test_every_option_of_a_subcommand_is_documented(page: ManPage, name: str) -> None:
    """Each option is in the command's SYNOPSIS line (in one of its spellings), and each long option
    has an entry in the OPTIONS subsection that names the command."""
    options, choices = _arguments_of(_subcommands(build_parser())[name])
    synopsis = set(page.synopsis_of(name))
    missing = sorted(choices - synopsis) + [" / ".join(o) for o in options if not synopsis & set(o)]
    assert not missing, f"docs/hbd.1: the SYNOPSIS line of hbd {name} lacks {missing}"
    described = page.options_of(name)
    undescribed = sorted(o for spellings in options for o in spellings if o.startswith("--") and o not in described)
    assert not undescribed, f"docs/hbd.1: OPTIONS has no entry for {undescribed} under a heading naming {name}"


def test_global_options_are_documented(page: ManPage) -> None:
    parser = build_parser()
    options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert {"--help", "--version"} <= options
    described = set().union(*(e.tags for e in page.entries if e.section == "OPTIONS"))
    assert not options - described, f"docs/hbd.1: OPTIONS has no entry for {sorted(options - described)}"
    assert any(line[:1] == ["hbd"] and options <= set(line) for line in page.synopsis), (
        f"docs/hbd.1: no SYNOPSIS line hbd {' | '.join(sorted(options))}"
    )


def test_the_parser_finds_what_it_should() -> None:
    """The checks above are only as good as this little roff reader: it must see tags, nesting and the
    options in .BI/.RB lines, and ignore words that are not bold."""
    page = parse(
        "\n".join(
            [
                ".SH SYNOPSIS",
                ".B hbd x",
                ".RB [ \\-\\-long\\-opt",
                ".IR value ]",
                ".br",
                ".B hbd y",
                ".SH OPTIONS",
                '.SS "x and y"',
                ".TP",
                '.BI \\-c " file" "\\fR, \\fP\\-\\-config " file',
                "Text about host.",
                ".SH CONFIGURATION",
                ".SS Server keys",
                ".TP",
                '.BR a_key ", " b_key',
                "Words, \\fBbold\\fR.",
                ".RS",
                ".TP",
                ".B inner",
                "x",
                ".TQ",
                ".B other",
                "y",
                ".RE",
                ".IP",
                "more",
                ".TP",
                ".B after",
                "z",
            ]
        )
    )
    assert page.synopsis == [["hbd", "x", "--long-opt"], ["hbd", "y"]]
    assert page.synopsis_of("y") == ["hbd", "y"] and page.synopsis_of("z") == []
    assert [e.tags for e in page.entries] == [{"-c", "--config"}, {"a_key", "b_key"}, {"after"}]
    assert page.options_of("y") == {"-c", "--config"} and page.options_of("z") == set()
    assert [c.tags for c in page.entries[1].children] == [{"inner", "other"}]
    assert page.entries[1].subsection == "Server keys" and not page.entries[2].children


# -- rendering -----------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff (Debian package groff-base)")
def test_groff_renders_it_without_warnings() -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    r = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-Tutf8", str(MANPAGE)], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0 and not r.stderr, f"groff warnings for docs/hbd.1:\n{r.stderr}"
