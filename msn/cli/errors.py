"""Every command's answer to bad input: one line, ``msn-xxx: error: MESSAGE``, and exit code 1 (:func:`fail`),
with Hydra's and omegaconf's composition errors explained as a line that names the fix."""

from __future__ import annotations

import errno
import itertools
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from msn.config import CONFIG_DIR, MSNConfig
from msn.errors import MSNError

# Config nodes that hold keys of the user's own: Hydra adds a key there only with +, or takes the whole node.
OPEN_NODE_EXAMPLES = {"data.dataset": "{_target_:mypkg.module.MyDataset,root:/data}",
                      "loss.extra_terms": "{name:{_target_:mypkg.terms.fn,weight:0.1}}",
                      "monitor.options": "{k:10}"}
OPEN_NODES = tuple(OPEN_NODE_EXAMPLES)


def fail(prog: str, error: BaseException | str) -> int:
    """Print ``PROG: error: LINE`` on stderr (:func:`error_line` of an exception) and return the exit code 1."""
    line = error if isinstance(error, str) else error_line(error)
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    return 1


def error_line(error: BaseException) -> str:
    """The one line a command prints for ``error``: an :class:`MSNError`'s message, a YAML file's syntax error
    (:func:`yaml_error_line`), a Hydra / omegaconf composition error explained (:func:`explain_hydra_error`)."""
    if isinstance(error, MSNError):
        return str(error).splitlines()[0]
    if _yaml_error(error) is not None:
        return yaml_error_line(_yaml_error(error))
    return explain_hydra_error(error)


def os_error_line(error: OSError) -> str:
    """An :class:`OSError` met before a run starts (its folder, a file it reads) as one line: the path, the
    system's reason and what to do about it."""
    path = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "") if error.filename else ""
    reason = error.strerror or type(error).__name__
    fixes = {errno.EROFS: "that file system is read-only: train in a folder on a writable one (hydra.run.dir=DIR)",
             errno.ENOSPC: "the disk is full: free space, or train on another disk (hydra.run.dir=DIR)",
             errno.ENAMETOOLONG: "shorten the path (run_name=SHORT_NAME, or a shorter hydra.run.dir)",
             errno.EACCES: "give yourself access to it (chmod / chown), or train in a folder you can write to "
                           "(hydra.run.dir=DIR)",
             errno.EEXIST: "something else already has that name there: move it away, or train in another folder "
                           "(run_name=NEW_NAME)",
             errno.ENOTDIR: "a part of the path is a file, not a folder: move it away, or train in another folder "
                            "(hydra.run.dir=DIR)",
             errno.EISDIR: "a folder has the name of a file msn writes: move it away, or train in another folder "
                           "(run_name=NEW_NAME)"}
    fixes[errno.EPERM] = fixes[errno.EACCES]
    fix = fixes.get(error.errno or 0, "check the path, or train in another folder (hydra.run.dir=DIR)")
    return f"{path + ': ' if path else ''}{reason}; {fix}"


def any_error_line(error: BaseException, where: str) -> str:
    """Any exception met ``where`` (before a run starts) as one line: :func:`error_line` for ours, omegaconf's,
    Hydra's and YAML's; an :class:`OSError` with its path and a fix (:func:`os_error_line`); anything else with
    its type and the first line of its message."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, OSError):
        return os_error_line(error)
    if isinstance(error, MSNError | ValueError | HydraException | OmegaConfBaseException) or _yaml_error(error):
        return error_line(error)
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{where}: {type(error).__name__}{': ' + text if text else ''}"


def _yaml_error(error: BaseException) -> Any:
    """The YAML syntax error (``yaml.MarkedYAMLError``) behind ``error`` (itself or its cause), or None."""
    import yaml

    for candidate in (error, error.__cause__, error.__context__):
        if isinstance(candidate, yaml.MarkedYAMLError):
            return candidate
    return None


def yaml_error_line(error: Any) -> str:
    """A YAML file that does not parse (``yaml.MarkedYAMLError``), as ``FILE, line L, column C: PROBLEM``."""
    mark = error.problem_mark or error.context_mark
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "a YAML file"
    problem = " ".join(str(part) for part in (error.context, error.problem) if part)
    return f"{where}: not valid YAML ({problem}); fix the file"


def missing_package_header(argv: Sequence[str], shipped: Path = CONFIG_DIR) -> str | None:
    """The one line for an ``experiment=NAME`` file of the user's (``--config-dir DIR``, ``hydra.searchpath``)
    whose header (its first ``# @KEY VALUE`` lines) lacks ``# @package _global_``, or None. Without it Hydra puts the
    file's keys under ``experiment.`` and reports something far from the cause (``data@experiment.data is not a
    config group``)."""
    folders, names = [], []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            folders.append(args[i + 1])
        elif arg.startswith("--config-dir="):
            folders.append(arg.split("=", 1)[1])
        elif arg.startswith("hydra.searchpath="):
            folders += [p.removeprefix("file://") for p in re.findall(r"file://[^,\]\s'\"]+", arg)]
        elif re.match(r"\+{0,2}experiment=", arg):
            names += [n.strip().strip("'\"") for n in arg.split("=", 1)[1].split(",")]
    for name in names:
        if not name or (shipped / "experiment" / f"{name}.yaml").is_file():
            continue  # the shipped experiments (found first by Hydra) all have the header
        for folder in folders:
            path = Path(folder).expanduser() / "experiment" / f"{name}.yaml"
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            # Hydra's header: the first lines that are blank or "# @KEY VALUE"; any other line ends it
            header = itertools.takewhile(lambda line: not line.strip() or re.match(r"\s*#\s*@", line), lines)
            if not any(re.fullmatch(r"#\s*@package\s+_global_", line.strip()) for line in header):
                return (f"{path} does not start with the line '# @package _global_' (an experiment file sets keys "
                        f"of every group, so Hydra needs it); add it as the file's first line")
    return None


def explain_hydra_error(error: BaseException) -> str:
    """Hydra's and omegaconf's composition errors as one line that names the fix: the nearest option of a
    group, the nearest real key (never Hydra's ``+key`` hint for a key the schema refuses), the expected type,
    or quoting for a value Hydra's grammar cannot read."""
    import difflib

    text = str(error)
    cause = str(error.__cause__ or "")
    missing = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        choices = re.findall(r"^\t(\S+)$", text.split("Available options", 1)[-1], flags=re.M)
        near = difflib.get_close_matches(option, choices, n=1)
        hint = f"did you mean {group}={near[0]}? " if near else ""
        return f"{group}={option} is not an option of {group}; {hint}choose one of {', '.join(choices)}"
    key = re.search(r"full_key: (\S+)", cause)
    if "could not be converted to" in cause and key:
        kind = re.search(r"converted to (\w+)", cause).group(1).lower()
        value = re.search(r"Value '([^']*)'", cause)
        expected = "a number" if kind in ("float", "int") else f"a {kind}"
        return f"{key.group(1)}={value.group(1) if value else '?'}: expected {expected} ({kind}); fix the value"
    override = re.search(r"Could not override '([^']+)'", text)
    if override or (key and "not in" in cause):
        name = override.group(1) if override else key.group(1)
        node = next((n for n in OPEN_NODES if name == n or name.startswith(n + ".")), None)
        if node is not None:
            example = OPEN_NODE_EXAMPLES[node]
            return (f"{name}: {node} holds keys of your own, which Hydra adds with a + ('+{name}=...') or takes as "
                    f"the whole node ('{node}={example}')")
        keys = schema_keys()
        near = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else "msn/config/schema.py lists the keys"
        return f"{name} is not a config group or key of msn-pretrain; {hint}"
    call = re.search(r"(\w+Error) while evaluating '([^']+)': (.+)", text)  # interval(1): a sweep function's arguments
    if call:
        return (f"{call.group(2)}: {call.group(3).strip()} ({call.group(1)}); interval(low, high), choice(a, b, ...) "
                "and range(start, stop[, step]) take the arguments of Hydra's override grammar")
    if "override_grammar" in text or "LexerNoViableAlt" in text or "mismatched input" in text:
        bad = re.search(r"(?:Error parsing override '|LexerNoViableAltException: )([^'\n]+)", text)
        shown = f"the override {bad.group(1)}" if bad else f"an override ({text.splitlines()[0]})"
        return (f"could not read {shown}: quote a value with spaces, braces or non-ASCII letters for Hydra, e.g. "
                "'data.root=\"/path/with spaces/ünïcode\"' (single quotes for the shell, double ones for Hydra)")
    return text.splitlines()[0] if text else type(error).__name__


def schema_keys() -> list[str]:
    """Every config key (``optim.lr``) and group (``model``) of msn-pretrain, for suggestions."""
    def walk(node: Any, prefix: str) -> list[str]:
        found = []
        for name, value in node.items():
            found.append(f"{prefix}{name}")
            if isinstance(value, DictConfig):
                found += walk(value, f"{prefix}{name}.")
        return found

    groups = [p.name for p in CONFIG_DIR.iterdir() if p.is_dir()]
    return sorted(set(walk(OmegaConf.structured(MSNConfig), "") + groups))
