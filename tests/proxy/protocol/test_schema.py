"""The generated ``_pb/Message_pb2.py`` matches ``Message.proto``, and both match the schema in
proxy/protocol/PROTOCOL.md, section 'Message'.

Regenerate after any change to the schema with (from the repository root)::

    python -m grpc_tools.protoc -I proxy/protocol --python_out=proxy/protocol/_pb Message.proto
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

import proxy.protocol
from proxy.protocol._pb import Message_pb2
from proxy.protocol.messages import MessageType

PROTO_DIR = Path(proxy.protocol.__file__).parent
PROTO = PROTO_DIR / "Message.proto"

# Transcribed from proxy/protocol/PROTOCOL.md, section 'Message' (the reference proxy's
# resources/Message.proto).
PACKAGE = "com.amazonaws.iot.securedtunneling"
FD = descriptor_pb2.FieldDescriptorProto
FIELDS = {
    # number: (name, type, label)
    1: ("type", FD.TYPE_ENUM, FD.LABEL_OPTIONAL),
    2: ("streamId", FD.TYPE_INT32, FD.LABEL_OPTIONAL),
    3: ("ignorable", FD.TYPE_BOOL, FD.LABEL_OPTIONAL),
    4: ("payload", FD.TYPE_BYTES, FD.LABEL_OPTIONAL),
    5: ("serviceId", FD.TYPE_STRING, FD.LABEL_OPTIONAL),
    6: ("availableServiceIds", FD.TYPE_STRING, FD.LABEL_REPEATED),
    7: ("connectionId", FD.TYPE_UINT32, FD.LABEL_OPTIONAL),
}
TYPES = {
    "UNKNOWN": 0,
    "DATA": 1,
    "STREAM_START": 2,
    "STREAM_RESET": 3,
    "SESSION_RESET": 4,
    "SERVICE_IDS": 5,
    "CONNECTION_START": 6,
    "CONNECTION_RESET": 7,
}


def _protoc(*args: str) -> None:
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", *args, PROTO.name])
    assert rc == 0, f"protoc {args} failed with {rc}"


def _embedded_descriptor(module_source: str) -> bytes:
    """The serialized FileDescriptorProto that a generated module passes to AddSerializedFile."""
    for node in ast.walk(ast.parse(module_source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            (arg,) = node.args
            assert isinstance(arg, ast.Constant)
            assert isinstance(arg.value, bytes)
            return arg.value
    raise AssertionError("no AddSerializedFile(...) call in the generated module")


@pytest.fixture(scope="module")
def checked_in() -> descriptor_pb2.FileDescriptorProto:
    """The descriptor the imported (checked-in) module registered."""
    return descriptor_pb2.FileDescriptorProto.FromString(Message_pb2.DESCRIPTOR.serialized_pb)


def test_generated_module_matches_a_fresh_compile(
    tmp_path: Path, checked_in: descriptor_pb2.FileDescriptorProto
) -> None:
    _protoc(f"--python_out={tmp_path}")
    fresh_source = (tmp_path / "Message_pb2.py").read_text(encoding="utf-8")
    fresh = descriptor_pb2.FileDescriptorProto.FromString(_embedded_descriptor(fresh_source))
    assert fresh == checked_in, "proxy/protocol/_pb/Message_pb2.py is stale: regenerate it"
    # The checked-in file embeds the same bytes it registers (nobody hand-edited one of them).
    checked_in_source = Path(Message_pb2.__file__).read_text(encoding="utf-8")
    assert _embedded_descriptor(checked_in_source) == Message_pb2.DESCRIPTOR.serialized_pb


def test_descriptor_set_of_the_proto_matches(
    tmp_path: Path, checked_in: descriptor_pb2.FileDescriptorProto
) -> None:
    """Compare against protoc's own descriptor set, not just its Python generator."""
    out = tmp_path / "Message.pb"
    _protoc(f"--descriptor_set_out={out}")
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    # A descriptor set spells out each field's json_name; generated Python leaves it implicit.
    # It is derived from the name, and nothing we use reads it.
    for message in compiled.message_type:
        for field in message.field:
            assert field.json_name == field.name
            field.ClearField("json_name")
    assert compiled == checked_in


def test_schema_matches_protocol_md(checked_in: descriptor_pb2.FileDescriptorProto) -> None:
    assert checked_in.syntax == "proto3"
    assert checked_in.package == PACKAGE
    (message,) = checked_in.message_type
    assert message.name == "Message"
    assert {f.number: (f.name, f.type, f.label) for f in message.field} == FIELDS
    assert [f.type_name for f in message.field if f.type == FD.TYPE_ENUM] == [
        f".{PACKAGE}.Message.Type"
    ]
    (enum,) = message.enum_type
    assert enum.name == "Type"
    assert {v.name: v.number for v in enum.value} == TYPES
    assert not message.nested_type
    assert not message.oneof_decl


def test_message_type_enum_mirrors_the_schema() -> None:
    assert {t.name: t.value for t in MessageType} == TYPES
    assert dict(Message_pb2.Message.Type.items()) == TYPES
    assert Message_pb2.Message.DESCRIPTOR.full_name == f"{PACKAGE}.Message"
