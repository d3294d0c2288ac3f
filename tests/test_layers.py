"""Layers import downward only (DESIGN §7): every ``bebop`` import in ``src/bebop`` — module-level or inside a
function — must point to a lower layer or stay inside its own package. Parsed with ``ast``, nothing is run."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bebop"

# Lower rank = lower layer. Modules directly under bebop/ (errors, config, io) are shared by all layers.
LAYERS: dict[str, int] = {
    "": 0,
    "core": 1, "tasks": 1,
    "models": 2,
    "engine": 3,
    "experimental": 4,
    "training": 5,
    "rl": 6,
    "integrations": 7,
    "experiments": 8,
    "cli": 9,
}


def package_of(module: str) -> str:
    """``bebop.engine.decode`` → ``engine``; ``bebop.errors`` → ``""`` (shared); ``bebop`` → ``""``."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    return parts[0] if (SRC / parts[0]).is_dir() else ""


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported bebop module) for every import statement in ``path``."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    here = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "bebop"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + (rel.name == "__init__")]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.split(".")[0] != "bebop":
                continue
            if module == "bebop":   # from bebop import engine
                out += [(node.lineno, f"bebop.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        src_pkg = rel.parts[0] if len(rel.parts) > 1 else ""
        assert src_pkg in LAYERS, f"package {src_pkg!r} has no layer in tests/test_layers.py"
        for line, module in imports_of(path):
            dst_pkg = package_of(module)
            assert dst_pkg in LAYERS, f"{rel}:{line} imports {module}, whose package has no layer"
            if dst_pkg == src_pkg or dst_pkg == "":
                continue
            if LAYERS[dst_pkg] >= LAYERS[src_pkg]:
                found.append(f"{rel}:{line} ({src_pkg}) imports {module} ({dst_pkg})")
    return found


def test_imports_point_downward() -> None:
    assert violations() == []


def test_shared_modules_import_no_layer() -> None:
    """errors / config / io sit under every layer, so they import only each other."""
    for path in SRC.glob("*.py"):
        for line, module in imports_of(path):
            assert package_of(module) == "", f"{path.name}:{line} imports {module}"


def test_detects_an_upward_import(tmp_path, monkeypatch) -> None:
    """The checker itself: an engine module importing training is reported."""
    fake = tmp_path / "bebop"
    for pkg in LAYERS:
        if pkg:
            (fake / pkg).mkdir(parents=True)
    (fake / "engine" / "bad.py").write_text("def f():\n    from bebop.training.sft import train_sft\n")
    (fake / "training" / "ok.py").write_text("from bebop.engine.bad import f\nfrom . import ok\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert violations() == ["engine/bad.py:2 (engine) imports bebop.training.sft (training)"]
