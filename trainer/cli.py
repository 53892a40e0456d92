"""The command line every script here shares: `--key=value` overrides of a config dataclass.

    cfg_overrides, flags = cli.parse(sys.argv[1:], [Config], flags={"smoke": "tiny sizes, for tests"}, doc=__doc__)

- `--help` prints the script's docstring, then every key with its type, default and the comment written beside
  the field in the dataclass, then the flags; it exits 0.
- A value is converted to the type of the field's default (`true/false/1/0` for bools); an unknown key, a
  repeated key, a value that does not convert or an argument not of the form `--key=value` raises `UsageError`
  naming the argument and what was expected.
- `cli.run(main)` runs a script's `main(argv)` and turns a `UsageError` into one line on stderr and exit code 2,
  without a traceback. Other exceptions keep theirs.
Also what every script writes next to its outputs: `git_revision()`, the code version, and `dumps()`, strict JSON.
Imports only the standard library.
"""

import dataclasses
import inspect
import json
import math
import re
import subprocess
import sys
from pathlib import Path

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


class UsageError(ValueError):
    """A bad command line or config value: shown to the user as one line, never as a traceback."""


def field_comments(cls):
    """{field name: the `# comment` written after it on its line in the class body} (empty where there is none)."""
    comments = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*?#\s*(.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def convert(key, text, default):
    """`text` as the type of `default`; a UsageError names `--key` and the expected type."""
    if isinstance(default, bool):
        if text.lower() not in BOOLEANS:
            raise UsageError(f"--{key}: expected true or false, got {text!r}")
        return BOOLEANS[text.lower()]
    kind = type(default)
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--{key}: expected {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}") from None


def _defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def help_text(classes, flags, doc, defaults=None):
    lines = [doc.strip(), ""] if doc else []
    for cls, keys in classes:
        comments = field_comments(cls)
        lines.append(f"{cls.__module__}.{cls.__name__} keys (--key=value):")
        for name, default in _defaults(cls).items():
            if keys is None or name in keys:
                note = f"  # {comments[name]}" if comments.get(name) else ""
                shown = (defaults or {}).get(name, default)  # a preset's value where the script applies one
                lines.append(f"  --{name}={shown}  ({type(default).__name__}){note}")
    if flags:
        lines.append("flags:")
        lines += [f"  --{name}  {text}" for name, text in flags.items()]
    lines.append("  --help  this text")
    return "\n".join(lines)


def parse(argv, classes, flags=None, doc="", defaults=None):
    """Overrides from `argv` for one or more config dataclasses.

    classes: a list of dataclasses, or of `(dataclass, allowed keys)` pairs; a key goes to the first class that
    has it. flags: {name: description} of bare `--name` switches. Returns `(overrides, set_flags)` with one dict
    of converted values per class, in order. `--help` prints help_text and exits 0, showing a key's value from
    `defaults` ({key: value}, e.g. a preset's) where it has one instead of the dataclass's default.
    """
    classes = [c if isinstance(c, tuple) else (c, None) for c in classes]
    flags = flags or {}
    if "--help" in argv or "-h" in argv:
        print(help_text(classes, flags, doc, defaults))
        sys.exit(0)
    owners = {}
    for i, (cls, keys) in enumerate(classes):
        for name, default in _defaults(cls).items():
            if (keys is None or name in keys) and name not in owners:
                owners[name] = (i, default)
    overrides, seen, set_flags = [{} for _ in classes], set(), set()
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and not eq and key in flags:
            set_flags.add(key)
            continue
        if not arg.startswith("--") or not eq or key not in owners:
            wanted = " or ".join([f"--{f}" for f in flags] + ["--key=value"])
            raise UsageError(f"argument {arg!r}: expected {wanted} with a key that --help lists")
        if key in seen:
            raise UsageError(f"--{key}: given twice; expected each key at most once")
        seen.add(key)
        index, default = owners[key]
        overrides[index][key] = convert(key, value, default)
    return overrides, set_flags


def checked(check, *args):
    """Call a config check; a ValueError it raises becomes a UsageError (one clear line for the user)."""
    try:
        return check(*args)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(main, argv=None):
    """`main(argv)` with a UsageError shown as `error: ...` on stderr and exit code 2, no traceback."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def git_revision():
    """The commit of this checkout, for the config.json every script writes next to its outputs ("unknown"
    outside git)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def json_safe(obj):
    """NaN and ±inf -> None, dataclasses -> dicts, tuples -> lists, dict keys -> str, recursively: what strict JSON
    can hold."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kw):
    """Strict JSON: json_safe, then json.dumps with allow_nan=False (no bare NaN, which other parsers reject)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)
