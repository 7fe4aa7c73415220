"""The layout's limits (issue 16), read from the source with `ast`: no module in training/, export/,
clients/ over ~700 lines, no function with more than 8 positional parameters, clients/__init__.py
only re-exports."""

from __future__ import annotations

import ast

from tests.conftest import REPO_ROOT

PACKAGES = ("training", "export", "clients")
MAX_LINES = 750  # "~700": a module past this is split, not grown
MAX_POSITIONAL = 8


def _modules(*folders: str):
    return sorted(p for folder in folders for p in (REPO_ROOT / folder).rglob("*.py"))


def test_no_module_is_too_long():
    long = {str(p.relative_to(REPO_ROOT)): n for p in _modules(*PACKAGES) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most ~700 lines): {long}"


def test_no_function_takes_more_than_8_positional_parameters():
    """Library and benchmark code (a pytest test's parameters are fixtures, passed by name)."""
    wide = []
    for path in _modules(*PACKAGES, "bench"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args]
                if names[:1] in (["self"], ["cls"]):
                    names = names[1:]
                if len(names) > MAX_POSITIONAL:
                    wide.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {getattr(node, 'name', 'lambda')} ({len(names)})")
    assert not wide, f"more than {MAX_POSITIONAL} positional parameters (pass a dataclass or keywords): {wide}"


def test_clients_init_only_reexports():
    tree = ast.parse((REPO_ROOT / "clients" / "__init__.py").read_text())
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        all_list = isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]
        assert docstring or all_list or isinstance(node, ast.ImportFrom | ast.Import), ast.unparse(node)[:80]

