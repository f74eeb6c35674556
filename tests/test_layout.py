"""The package's shape: command-line modules are thin shells that no library module imports."""

import ast
from pathlib import Path

import msn

CLI_MODULES = {"msn.train", "msn.export", "msn.evaluate", "msn.bench"}  # each holds a console script's main()
PACKAGE = Path(msn.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # "from msn import evaluate"
    return names


def test_no_library_module_imports_a_cli_module():
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        module = f"msn.{path.stem}"
        if module in CLI_MODULES:
            continue
        bad = _imports(path) & CLI_MODULES
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, offenders


def test_cli_modules_import_no_other_cli_module():
    for module in CLI_MODULES:
        path = PACKAGE / f"{module.removeprefix('msn.')}.py"
        if path.is_file():
            assert not (_imports(path) & (CLI_MODULES - {module})), module
