"""The house's rules (docs/architecture.md): imports point down the layers of pyproject.toml and form no circle;
no source file outgrows one reading; the architecture diagram is the one the code gives."""

import ast
import importlib.util
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_imports_point_down_the_layers_and_form_no_circle():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_source_file_is_longer_than_one_reading():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "src").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_architecture_diagram_is_the_one_the_code_gives():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_every_import_in_the_package_resolves():
    """Lazy imports inside functions too: a module moved without its relative imports fails only when run."""
    unresolved = []
    for path in sorted((ROOT / "src" / "ctrldiff").rglob("*.py")):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        package = parts if parts[-1] == "__init__" else parts[:-1]
        package = package[:-1] if package[-1] == "__init__" else package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                if not _exists(module):
                    unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    assert not unresolved, unresolved
