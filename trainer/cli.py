"""The command line every script here shares: overrides of a config dataclass, from the command line and files.

    cfg_overrides, flags = cli.parse(sys.argv[1:], [Config], flags={"smoke": "tiny sizes, for tests"}, doc=__doc__)

- `--key=value` or `--key value`; a bool key also bare (`--gradient_checkpointing` means true). A value is
  converted to the type of the field's default (`true/false/1/0` for bools).
- `--config=<file>` (`.yaml`, `.yml` or `.json`; YAML needs PyYAML) reads keys from a flat mapping; a run's own
  config.json (the mapping under its "config") repeats that run. Keys on the command line override the file's.
- `aliases` ({other name: key}) accept a second name for a key (train_full takes the diffusers training scripts'
  names where they mean the same); `notes` ({name: text}) answer a name that has no equivalent here.
- `--help` prints the script's docstring, then every key with its type, default, other names and the comment
  written beside the field in the dataclass, then the flags; it exits 0.
- An unknown key (answered with the closest keys: "did you mean ..."), a key given twice, a value that does not
  convert or an argument not of these forms raises `UsageError` naming the argument and what was expected.
- `cli.run(main)` runs a script's `main(argv)` and turns a `UsageError` into one line on stderr and exit code 2,
  without a traceback. Other exceptions keep theirs.
Also what every script writes next to its outputs: `git_revision()`, the code version, `dumps()`, strict JSON, and
`write_atomic()`, the one way an output file is written (temp + rename; a failed write names the file).
Imports only the standard library (PyYAML when a YAML file is read).

Why our own parser and not a library: the scripts layer a preset's, a recipe's and --smoke's values under what the
user typed, so the parser returns only the keys given, per dataclass, not a config filled in with defaults; --help
reads the comments beside the fields; a bad argument is one line. argparse (Python 3.11) has no "did you mean" and
prints its usage block on an error; tyro, jsonargparse and simple-parsing fill in the whole config (the layering
would need a second pass to learn which keys were typed) and add dependencies to scripts that otherwise need only
torch (the toy). The rules above take a page of standard library, tested in tests/test_cli.py.
"""

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


class UsageError(ValueError):
    """A bad command line or config value: shown to the user as one line, never as a traceback."""


class WriteError(OSError):
    """An output file that could not be written (a full disk, a read-only folder): its message names the file."""


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


def from_file(key, value, default, source):
    """A value read from a config file as the type of `default`: strings convert as on the command line (YAML
    reads 3e-4 as a string), an int serves a float key, an empty YAML value a string key; else a UsageError."""
    if isinstance(value, str) and not isinstance(default, str):
        return convert(key, value, default)
    if value is None and isinstance(default, str):
        return ""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise UsageError(f"{source}: {key}: expected {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    return value


def _defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def help_text(classes, flags, doc, aliases=None, defaults=None):
    others = {}
    for name, key in (aliases or {}).items():
        others.setdefault(key, []).append(f"--{name}")
    lines = [doc.strip(), ""] if doc else []
    lines += [
        "--key=value or --key value; a bool key alone means true (--key); --config=<file.yaml|.json> reads keys",
        "from a file (a run's config.json repeats the run), the command line overriding it.",
        "",
    ]
    for cls, keys in classes:
        comments = field_comments(cls)
        lines.append(f"{cls.__module__}.{cls.__name__} keys (--key=value):")
        for name, default in _defaults(cls).items():
            if keys is None or name in keys:
                note = f"  # {comments[name]}" if comments.get(name) else ""
                also = f"  (also {', '.join(others[name])})" if name in others else ""
                shown = (defaults or {}).get(name, default)  # a preset's value where the script applies one
                lines.append(f"  --{name}={shown}  ({type(default).__name__}){also}{note}")
    if flags:
        lines.append("flags:")
        lines += [f"  --{name}  {text}" for name, text in flags.items()]
    lines.append("  --help  this text")
    return "\n".join(lines)


def read_config_file(path):
    """The {key: value} mapping of a YAML or JSON file; a run's config.json gives the mapping under "config"."""
    file = Path(path)
    if file.suffix not in (".yaml", ".yml", ".json"):
        raise UsageError(f"--config: expected a .yaml, .yml or .json file, got {path!r}")
    if not file.is_file():
        raise UsageError(f"--config: no file {path!r}")
    if file.suffix == ".json":
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"--config: {path} is not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UsageError("--config: reading YAML needs PyYAML (pip install pyyaml); or pass a .json file") from None
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise UsageError(f"--config: {path} is not valid YAML ({' '.join(str(e).split())})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run's config.json: its resolved config, beside the command and revision
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(f"--config: expected a mapping of keys to values in {path}, got {type(data).__name__}")
    return data


def parse(argv, classes, flags=None, doc="", aliases=None, notes=None, defaults=None):
    """Overrides from `argv` (and the --config file it names) for one or more config dataclasses.

    classes: a list of dataclasses, or of `(dataclass, allowed keys)` pairs; a key goes to the first class that
    has it. flags: {name: description} of bare `--name` switches. aliases: {other name: key}; notes: {name: why
    it is not a key here}. Returns `(overrides, set_flags)` with one dict of converted values per class, in order:
    the file's keys, then the command line's over them. `--help` prints help_text and exits 0, showing a key's
    value from `defaults` ({key: value}, e.g. a preset's) where it has one instead of the dataclass's default.
    """
    classes = [c if isinstance(c, tuple) else (c, None) for c in classes]
    flags, aliases, notes = flags or {}, aliases or {}, notes or {}
    if "--help" in argv or "-h" in argv:
        print(help_text(classes, flags, doc, aliases, defaults))
        sys.exit(0)
    owners = {}
    for i, (cls, keys) in enumerate(classes):
        for name, default in _defaults(cls).items():
            if (keys is None or name in keys) and name not in owners:
                owners[name] = (i, default)
    aliases = {name: key for name, key in aliases.items() if key in owners}
    forms = " or ".join([f"--{f}" for f in flags] + ["--key=value"])

    def unknown(name, where):
        """What `notes` says of a name no class has, or the closest names."""
        if name in notes:
            return UsageError(f"{where}: no such key here: {notes[name]}")
        close = difflib.get_close_matches(name, [*owners, *aliases, *flags, "config"], n=3, cutoff=0.6)
        guess = f"did you mean {' or '.join('--' + c for c in close)}? " if close else ""
        return UsageError(f"{where}: unknown key, {guess}(expected {forms} with a key that --help lists)")

    given, set_flags, config, args = {}, set(), None, list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not name:
            raise UsageError(f"argument {arg!r}: expected {forms} (or --key value) with a key that --help lists")
        if not eq and name in flags:
            set_flags.add(name)
            continue
        key = aliases.get(name, name)
        if key != "config" and key not in owners:
            raise unknown(name, f"argument {arg!r}")
        if not eq:
            value = take_value(name, args, owners[key][1] if key in owners else "")
        if key in given or (key == "config" and config is not None):
            first = given.get(key, (key,))[0]
            raise UsageError(f"--{name}: given twice{f' (also as --{first})' if first != name else ''}; expected once")
        if key == "config":
            config = value
        else:
            given[key] = (name, convert(name, value, owners[key][1]))
    overrides = [{} for _ in classes]
    for name, value in (read_config_file(config) if config is not None else {}).items():
        key = aliases.get(name, name)
        if key not in owners:
            raise unknown(name, f"--config: {name} in {config}")
        overrides[owners[key][0]][key] = from_file(name, value, owners[key][1], config)
    for key, (_, value) in given.items():
        overrides[owners[key][0]][key] = value
    return overrides, set_flags


def take_value(name, args, default):
    """The value of `--name value`: the next argument; a bool key without one (or followed by another --key)
    means true."""
    following = args[0] if args else None
    if isinstance(default, bool):
        if following is not None and following.lower() in BOOLEANS:
            return args.pop(0)
        return "true"
    if following is None or following.startswith("--"):
        raise UsageError(f"--{name}: expected a value (--{name}=VALUE or --{name} VALUE)")
    return args.pop(0)


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


def write_error(path, error):
    """A WriteError naming `path` for the OSError (or torch's writer error, which carries no errno) `error`."""
    if isinstance(error, OSError) and error.strerror:
        why = error.strerror
    else:
        why = f"{str(error).splitlines()[0]}: is the disk full?"
    failed = WriteError(f"could not write {path} ({why})")
    failed.errno = getattr(error, "errno", None)
    return failed


def write_atomic(path, text):
    """Write `text` to `path` whole or not at all: a temp file beside it, fsynced, renamed over it. A kill or a
    full disk mid-write leaves the previous file (or none), never half of one; the error names the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
