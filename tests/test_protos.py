"""The wire contract (proto/npo/v1): committed stubs are fresh, and the files follow proto/README.md's rules
(versioned package, a comment on everything, enums starting at an UNSPECIFIED zero, no untyped bytes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
STUB_ROOT = REPO / "services" / "proto"

_spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
gen_protos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_protos)

needs_grpc_tools = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed (it is in CI)"
)
PROTO_NAMES = ["common", "guidance_cache", "learner", "rollout"]


@needs_grpc_tools
def test_committed_stubs_are_not_stale():
    stale = gen_protos.stale_files(STUB_ROOT, PROTO_ROOT)
    assert stale == [], f"stale generated files {stale}: regenerate with `python scripts/gen_protos.py`"
    committed = gen_protos.generated_files(STUB_ROOT)
    assert {f"npo/v1/{name}_pb2.py" for name in PROTO_NAMES} <= set(committed)
    assert "npo/v1/guidance_cache_pb2_grpc.py" in committed and "npo/v1/common_pb2.pyi" in committed


@needs_grpc_tools
def test_staleness_check_notices_an_edited_proto(tmp_path):
    edited = tmp_path / "proto"
    (edited / "npo" / "v1").mkdir(parents=True)
    for path in (PROTO_ROOT / "npo" / "v1").glob("*.proto"):
        (edited / "npo" / "v1" / path.name).write_text(path.read_text())
    common = edited / "npo" / "v1" / "common.proto"
    common.write_text(common.read_text().replace("bool finished = 7;", "bool finished = 7;\n  // New.\n  int32 x = 8;"))
    assert gen_protos.stale_files(STUB_ROOT, edited) == ["npo/v1/common_pb2.py", "npo/v1/common_pb2.pyi"]


def test_stubs_import_as_a_package_without_touching_the_core():
    code = (
        "import sys; import services.proto.npo.v1.guidance_cache_pb2_grpc, services.proto.npo.v1.learner_pb2_grpc, "
        "services.proto.npo.v1.rollout_pb2_grpc; print(sorted(m for m in sys.modules if m.startswith('npo')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"  # `from npo.v1 import` was rewritten: the npo core is not imported


def file_descriptors() -> list[descriptor_pb2.FileDescriptorProto]:
    """The .proto files with their comments (source info), compiled by grpcio-tools' protoc."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.bin"
        names = [str(p.relative_to(PROTO_ROOT)) for p in gen_protos.proto_files(PROTO_ROOT)]
        args = ["protoc", f"-I{PROTO_ROOT}", "--include_source_info", f"--descriptor_set_out={out}", *names]
        assert protoc.main(args) == 0
        return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def uncommented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Paths of the messages, fields, enums, enum values, services and methods of `file` with no leading comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
    missing = []

    def check(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(f"{file.name}: {name}")

    def walk_enum(enum, path, prefix):
        check(path, f"{prefix}{enum.name}")
        for i, value in enumerate(enum.value):
            check((*path, 2, i), f"{prefix}{enum.name}.{value.name}")

    def walk_message(message, path, prefix):
        check(path, f"{prefix}{message.name}")
        for i, field in enumerate(message.field):
            check((*path, 2, i), f"{prefix}{message.name}.{field.name}")
        for i, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                walk_message(nested, (*path, 3, i), f"{prefix}{message.name}.")
        for i, enum in enumerate(message.enum_type):
            walk_enum(enum, (*path, 4, i), f"{prefix}{message.name}.")

    for i, message in enumerate(file.message_type):
        walk_message(message, (4, i), "")
    for i, enum in enumerate(file.enum_type):
        walk_enum(enum, (5, i), "")
    for i, service in enumerate(file.service):
        check((6, i), service.name)
        for j, method in enumerate(service.method):
            check((6, i, 2, j), f"{service.name}.{method.name}")
    return missing


@needs_grpc_tools
def test_every_proto_element_has_a_comment_and_the_package_is_versioned():
    files = file_descriptors()
    assert sorted(Path(f.name).stem for f in files) == PROTO_NAMES
    assert {f.package for f in files} == {"npo.v1"}
    assert {f.syntax for f in files} == {"proto3"}
    missing = [name for f in files for name in uncommented(f)]
    assert missing == [], "add a comment to: " + ", ".join(missing)
    # The checker does see a missing comment:
    bare = descriptor_pb2.FileDescriptorProto(name="x.proto")
    bare.message_type.add(name="M").field.add(name="f", number=1)
    assert uncommented(bare) == ["x.proto: M", "x.proto: M.f"]


def stub_descriptors():
    from services.proto.npo.v1 import common_pb2, guidance_cache_pb2, learner_pb2, rollout_pb2

    return [module.DESCRIPTOR for module in (common_pb2, guidance_cache_pb2, learner_pb2, rollout_pb2)]


def all_messages(file):
    pending = list(file.message_types_by_name.values())
    while pending:
        message = pending.pop()
        pending.extend(message.nested_types)
        yield message


def test_enums_start_at_an_unspecified_zero():
    enums = []
    for file in stub_descriptors():
        enums += list(file.enum_types_by_name.values())
        for message in all_messages(file):
            enums += list(message.enum_types)
    assert {e.name for e in enums} >= {"TrainingMode", "LearnerState"}
    for enum in enums:
        prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_")
        assert enum.values[0].number == 0 and enum.values[0].name == f"{prefix}_UNSPECIFIED", enum.full_name
        assert all(value.name.startswith(prefix + "_") for value in enum.values), enum.full_name


def test_no_untyped_bytes_and_floats_travel_as_doubles():
    for file in stub_descriptors():
        for message in all_messages(file):
            names = set(message.fields_by_name)
            for field in message.fields:
                if field.type == field.TYPE_BYTES:
                    assert {"dtype", "shape"} <= names, f"{field.full_name}: bytes need dtype and shape fields"
                assert field.type != field.TYPE_FLOAT, f"{field.full_name}: use double (float32 loses precision)"
    from services.proto.npo.v1 import common_pb2

    sample = common_pb2.Sample(response_ids=[5, 6], logprobs=[0.1 + 0.2, -1e-300])
    wire = sample.SerializeToString()
    assert list(common_pb2.Sample.FromString(wire).logprobs) == [0.1 + 0.2, -1e-300]  # bit-exact
    assert wire[:4] == b"\x12\x02\x05\x06"  # response_ids packed: one length-delimited record, not a tag per id
