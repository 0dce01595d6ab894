"""Generate the Python gRPC stubs of proto/npo/v1/*.proto into services/proto/npo/v1/ (the one documented command).

    .venv/bin/python scripts/gen_protos.py            # regenerate the committed stubs
    .venv/bin/python scripts/gen_protos.py --check    # exit 1 if the committed stubs are stale

Uses grpcio-tools (its bundled protoc, no system protoc). protoc writes `from npo.v1 import common_pb2`, which would
resolve to this repository's `npo` package, so the imports are rewritten to `services.proto.npo.v1`. The output
depends only on the .proto files and the grpcio-tools version; tests/test_protos.py regenerates into a temporary
folder and compares byte for byte.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
"""The protoc include root: files are named npo/v1/<name>.proto below it."""
STUB_ROOT = REPO / "services" / "proto"
"""Where the Python package services.proto.npo.v1 lives."""
PROTO_PACKAGE = "npo/v1"
"""The proto package's folder, below both roots."""
PYTHON_PACKAGE = "services.proto.npo.v1"
"""Importable name of the generated package."""

INIT_FILES = {
    "__init__.py": '"""Generated gRPC stubs of proto/ (scripts/gen_protos.py); import services.proto.npo.v1."""\n',
    "npo/__init__.py": '"""Generated stubs of the proto package npo (scripts/gen_protos.py)."""\n',
    "npo/v1/__init__.py": '"""Generated stubs of the proto package npo.v1 (scripts/gen_protos.py); do not edit."""\n',
}
"""Package files written next to the stubs (relative to STUB_ROOT), so that the stubs import as a package."""

_IMPORT = re.compile(r"^from npo\.v1 import ", re.MULTILINE)
_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'npo\.v1\.")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the package, sorted by name."""
    files = sorted((proto_root / PROTO_PACKAGE).glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE}")
    return files


def rewrite_imports(source: str) -> str:
    """Point protoc's `from npo.v1 import x_pb2` lines, and the module name given to the message classes, at the
    generated package (services.proto.npo.v1)."""
    source = _IMPORT.sub(f"from {PYTHON_PACKAGE} import ", source)
    return _MODULE_NAME.sub(rf"\1'{PYTHON_PACKAGE}.", source)


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs (x_pb2.py, x_pb2.pyi, x_pb2_grpc.py per proto) and the package __init__ files under
    `out_root` (laid out like STUB_ROOT). Returns the written paths relative to `out_root`, sorted."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ImportError("grpcio-tools is not installed (pip install grpcio-tools)") from None
    files = proto_files(proto_root)
    with tempfile.TemporaryDirectory(prefix="npo-protos-") as raw:
        args = ["grpc_tools.protoc", f"-I{proto_root}", f"--python_out={raw}", f"--pyi_out={raw}"]
        args += [f"--grpc_python_out={raw}"] + [str(f.relative_to(proto_root)) for f in files]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(f.name for f in files)} (see the messages above)")
        written = []
        for path in sorted((Path(raw) / PROTO_PACKAGE).iterdir()):
            target = out_root / PROTO_PACKAGE / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(rewrite_imports(path.read_text()))
            written.append(target.relative_to(out_root))
    for name, text in INIT_FILES.items():
        (out_root / name).parent.mkdir(parents=True, exist_ok=True)
        (out_root / name).write_text(text)
        written.append(Path(name))
    return sorted(written)


def generated_files(root: Path) -> dict[str, bytes]:
    """{relative path: content} of every generated file (stubs and package __init__ files) under `root`."""
    paths = [root / name for name in INIT_FILES]
    paths += [p for p in (root / PROTO_PACKAGE).glob("*_pb2*") if p.suffix in (".py", ".pyi")]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(paths) if p.is_file()}


def stale_files(committed_root: Path = STUB_ROOT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files that differ between a fresh generation and `committed_root`: changed, missing or extra."""
    with tempfile.TemporaryDirectory(prefix="npo-protos-check-") as fresh:
        generate(Path(fresh), proto_root)
        expected = generated_files(Path(fresh))
    committed = generated_files(committed_root)
    return sorted(name for name in expected.keys() | committed.keys() if expected.get(name) != committed.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1), write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: services/proto/{name}", file=sys.stderr)
        if stale:
            print("regenerate with: python scripts/gen_protos.py", file=sys.stderr)
        return 1 if stale else 0
    old_stubs = [p for p in (STUB_ROOT / PROTO_PACKAGE).glob("*_pb2*") if p.suffix in (".py", ".pyi")]
    with tempfile.TemporaryDirectory(prefix="npo-protos-out-") as fresh:
        written = generate(Path(fresh))
        for path in old_stubs:  # stubs of a deleted .proto must not linger
            path.unlink()
        for name in written:
            (STUB_ROOT / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(fresh) / name, STUB_ROOT / name)
    for name in written:
        print(f"wrote services/proto/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
