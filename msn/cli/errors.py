"""Every command's answer to bad input: one line, ``msn-xxx: error: MESSAGE``, and exit code 1 (:func:`fail`),
with Hydra's and omegaconf's composition errors explained as a line that names the fix."""

from __future__ import annotations

import re
import sys
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
    """The one line a command prints for ``error``: an :class:`MSNError`'s message, or a Hydra / omegaconf
    composition error explained (:func:`explain_hydra_error`)."""
    if isinstance(error, MSNError):
        return str(error).splitlines()[0]
    return explain_hydra_error(error)


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
