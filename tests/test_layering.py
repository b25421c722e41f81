"""The import layering of the README's "Layout" section, checked on the source: each part of
rosjax imports only the parts below it, so there is no import cycle among them."""
import ast
import pathlib

ROSJAX = pathlib.Path(__file__).resolve().parents[1] / "rosjax"
# What each part may import (the README's table; modules of a part may import each other).
ALLOWED = {
    "errors": set(), "atomic": set(), "progress": set(), "config": set(),
    "losses": {"config"}, "models": {"config"},
    "checkpoint": {"errors", "checkpoint_integrity", "checkpoint_meta"},
    "checkpoint_integrity": set(), "checkpoint_meta": set(),
    "data": {"errors", "atomic", "config"},
    "eval": {"losses", "atomic", "progress"},
    "train": {"losses", "models", "checkpoint", "atomic", "config", "data", "eval"},
    "distill": {"train", "data", "losses", "models", "checkpoint", "progress", "atomic", "config"},
}


def imported_parts(path: pathlib.Path) -> set[str]:
    """The rosjax parts (top-level modules or packages) that the module at `path` imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rosjax"):
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("rosjax")]
        else:
            continue
        for name in names:
            part = name.split(".")[1] if "." in name else None
            if part and ((ROSJAX / part).is_dir() or (ROSJAX / f"{part}.py").exists()):
                parts.add(part)
    return parts


def test_every_part_imports_only_the_parts_below_it():
    wrong = []
    for path in ROSJAX.rglob("*.py"):
        part = path.relative_to(ROSJAX).parts[0].removesuffix(".py")
        if part in ("experiment", "__init__"):  # the top: it may import everything
            continue
        for other in imported_parts(path) - {part} - ALLOWED[part]:
            wrong.append(f"{path.relative_to(ROSJAX)} imports rosjax.{other}")
    assert not wrong, wrong


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The check can fail: a module of train importing distill is caught."""
    module = tmp_path / "bad.py"
    module.write_text("from rosjax.distill import steps\nimport rosjax.eval.metrics\n")
    assert imported_parts(module) == {"distill", "eval"} and "distill" not in ALLOWED["train"]
