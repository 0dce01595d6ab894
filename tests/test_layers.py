"""The layering rule: package `npo` never imports grpc, redis, fastapi, ray, vllm or deepspeed.

Checked two ways: dynamically (a fresh interpreter imports npo and every submodule found by walking the package, then
inspects sys.modules) and statically (every .py file under npo/ is parsed and its import statements are read).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import npo

FORBIDDEN = ("grpc", "redis", "fastapi", "ray", "vllm", "deepspeed")
REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "npo"

IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys, traceback
sys.path.insert(0, {repo!r})
import npo
failed = {{}}
def onerror(name):
    failed[name] = traceback.format_exc()
imported = ["npo"]
for info in pkgutil.walk_packages(npo.__path__, "npo.", onerror=onerror):
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except BaseException:
        failed[info.name] = traceback.format_exc()
forbidden = {forbidden!r}
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({{"file": npo.__file__, "imported": imported, "failed": failed, "loaded": loaded}}))
"""


def forbidden_imports(source: str, filename: str = "<string>") -> list[str]:
    """`file:line name` for every import of a forbidden package (import, from-import, import_module/__import__)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n.split(".")[0] in FORBIDDEN]
    return [f"{filename}:{line} {name}" for line, name in sorted(found)]


def test_importing_every_npo_module_loads_no_forbidden_package():
    script = IMPORT_EVERYTHING.format(repo=str(REPO), forbidden=FORBIDDEN)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().parent == PACKAGE, "imported an npo package other than this checkout's"
    assert not report["failed"], "npo submodules failed to import:\n" + "\n".join(
        f"--- {name}\n{trace}" for name, trace in report["failed"].items()
    )
    expected = {
        "npo." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.stem != "__init__"
    }
    assert expected <= set(report["imported"]), f"not walked: {sorted(expected - set(report['imported']))}"
    assert report["loaded"] == [], f"npo pulled in forbidden modules: {report['loaded']}"


def test_no_npo_source_file_imports_a_forbidden_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "core" / "loss.py" in files and Path(npo.__file__).resolve() in files
    found = []
    for path in files:
        found += forbidden_imports(path.read_text(), str(path.relative_to(REPO)))
    assert found == [], "forbidden imports in npo/:\n" + "\n".join(found)


def test_static_scan_detects_every_import_form():
    source = (
        "import os\n"
        "import redis.asyncio\n"
        "from ray import tune\n"
        "from .grpc import helper\n"  # relative: a local module named grpc, allowed
        "import importlib\n"
        "importlib.import_module('vllm.engine')\n"
        "__import__('deepspeed')\n"
        "import fastapiextra\n"  # a different package whose name starts the same
        "def f():\n"
        "    import grpc\n"
    )
    found = forbidden_imports(source, "x.py")
    assert found == ["x.py:2 redis.asyncio", "x.py:3 ray", "x.py:6 vllm.engine", "x.py:7 deepspeed", "x.py:10 grpc"]
