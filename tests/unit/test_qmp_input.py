"""QMP input, below the server: the JSON streamer's limits and strict parsing, and the
command table's argument checks (QEMU's words for each mistake)."""

import json

import pytest
from hypothesis import given, strategies as st

from vmm.qmp import commands, json_stream
from vmm.qmp.json_stream import BadInput, JsonStream, Message
from vmm.qmp.schema import SchemaError


def feed(stream, *chunks):
    out = []
    for chunk in chunks:
        out += stream.feed(chunk)
    return out


def test_messages_are_cut_by_brackets_not_newlines():
    stream = JsonStream()
    out = feed(stream, b'{"execute": "a"}{"execute"', b': "b", "x": "}{"}  [1]\r\n')
    assert out == [Message({"execute": "a"}), Message({"execute": "b", "x": "}{"}),
                   Message([1])]


def test_nesting_past_the_limit_is_one_error_and_the_stream_goes_on():
    stream = JsonStream()
    out = feed(stream, b"[" * 200_000, b"]" * 200_000, b'{"execute": "after"}')
    assert len(out) == 2 and isinstance(out[0], BadInput)
    assert "deeper than 1024" in out[0].desc
    assert out[1] == Message({"execute": "after"})
    deepest = b"[" * 1024 + b"]" * 1024
    assert feed(JsonStream(), deepest) == [Message(json.loads(deepest))]


def test_a_message_past_the_size_limit_is_skipped_without_being_kept():
    stream = JsonStream()
    head = b'{"execute": "x", "arguments": {"a": "'
    out = feed(stream, head, *[b"a" * 65536] * 128)          # 8 MiB, no closing brace
    assert len(out) == 1 and "longer than" in out[0].desc
    assert len(stream._buffer) == 0                           # nothing of it is kept
    out = feed(stream, b'"}}', b'{"execute": "after"}')
    assert out == [Message({"execute": "after"})]


def test_bytes_outside_a_message_are_reported_once_per_run():
    out = feed(JsonStream(), b'garbage  more {"execute": "x"} ]')
    assert [type(item) for item in out] == [BadInput, BadInput, Message, BadInput]


@pytest.mark.parametrize("text, words", [
    (b'{"a": "\xff\xfe"}', "invalid UTF-8"),
    (b'{"a": NaN}', "'NaN' is not a JSON number"),
    (b'{"a": Infinity}', "'Infinity'"),
    (b'{"a": -Infinity}', "'-Infinity'"),
    (b'{"a": 1e400}', "out of range"),
    (b'{"a": 123456789012345678901234567890}', "out of range"),
    (b'{"a": ' + b"9" * 5000 + b"}", "out of range"),
    (b'{"a": }', "JSON parse error"),
    (b'{"a": 1,}', "JSON parse error"),
])
def test_strict_parsing(text, words):
    [item] = feed(JsonStream(), text)
    assert isinstance(item, BadInput) and words in item.desc


@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                    lambda children: st.lists(children, max_size=4) |
                    st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20),
       st.integers(1, 7))
def test_any_json_object_survives_any_chunking(value, chunk):
    message = {"execute": "x", "arguments": {"v": value}}
    data = json.dumps(message).encode()
    stream = JsonStream()
    out = feed(stream, *[data[i:i + chunk] for i in range(0, len(data), chunk)])
    assert out == [Message(json.loads(data))]


def check(name, arguments):
    return commands.COMMANDS[name].args.check(arguments)


@pytest.mark.parametrize("name, arguments, desc", [
    ("stop", {"bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("blockdev-add", {"node-name": "a"}, "Parameter 'file' is missing"),
    ("blockdev-add", {"node-name": 1, "file": {}}, "Invalid parameter type for 'node-name', "
                                                   "expected: string"),
    ("blockdev-add", {"node-name": "a", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"node-name": "a", "file": {"driver": "nbd", "filename": "/x"}},
     "Parameter 'file.driver' does not accept value 'nbd'; allowed: file, host_device"),
    ("blockdev-add", {"node-name": "a", "file": {"driver": "file", "filename": "/x",
                                                 "locking": "on"}},
     "Parameter 'file.locking' is unexpected"),
    ("blockdev-add", {"node-name": "a", "file": {"driver": "file", "filename": "/x"},
                      "read-only": "yes"},
     "Invalid parameter type for 'read-only', expected: boolean"),
    ("device_add", {"id": "a"}, "Parameter 'driver' is missing"),
    ("device_add", {"id": "a", "driver": "e1000"}, "does not accept value 'e1000'"),
    ("device_add", {"id": "a", "driver": "virtio-blk-mmio", "num-queues": 4},
     "Parameter 'num-queues' is 4; allowed 1..1"),
    ("device_add", {"id": "a", "driver": "virtio-blk-mmio", "share-rw": "maybe"},
     "Invalid parameter type for 'share-rw', expected: boolean"),
    ("qmp_capabilities", {"enable": ["oob"]}, "Parameter 'enable[0]' does not accept value "
                                              "'oob'; allowed: none"),
    ("getfd", {"fdname": "x" * 200}, "longer than 64"),
    ("device_add", {"id": "a/b", "driver": "virtio-blk-mmio"},
     "Parameter 'id' expects an id: 1..64 characters, a letter first"),
    ("blockdev-add", {"node-name": "9x", "file": {"driver": "file", "filename": "/x"}},
     "Parameter 'node-name' expects an id"),
    ("netdev_add", {"id": "n" * 65}, "Parameter 'id' expects an id"),
    ("query-status", {"x": None}, "Parameter 'x' is unexpected"),
])
def test_arguments_are_checked_before_any_handler(name, arguments, desc):
    with pytest.raises(SchemaError) as error:
        check(name, arguments)
    assert desc in str(error.value)


def test_kata_shapes_are_accepted_and_defaults_filled():
    blockdev = check("blockdev-add", {
        "node-name": "drive-1", "driver": "raw", "read-only": False,
        "file": {"driver": "file", "filename": "/x", "aio": "native"}})
    assert blockdev["read-only"] is False and blockdev["file"]["aio"] == "native"
    assert check("blockdev-add", {"node-name": "a", "file": {"driver": "host_device",
                                                             "filename": "/dev/x"}})["read-only"] is False
    device = check("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio",
                                  "drive": "drive-1", "addr": "1", "romfile": "",
                                  "share-rw": "on"})
    assert device["share-rw"] is True and device["addr"] == "1"


def test_the_table_names_each_command_once_with_a_doc():
    names = [command.name for command in commands.TABLE]
    assert len(names) == len(set(names))
    seed = {"qmp_capabilities", "quit", "stop", "cont", "query-status", "query-cpus",
            "query-hotpluggable-cpus", "device_add", "device_del", "blockdev-add",
            "blockdev-del", "netdev_add", "netdev_del", "getfd"}
    more = {"query-version", "query-commands", "system_reset", "system_powerdown",
            "query-block", "query-events"}
    assert seed | more <= set(names)
    assert all(command.doc for command in commands.TABLE)


def test_parse_limits_are_qemus():
    assert json_stream.MAX_DEPTH == 1024
