"""The path layer's appender, which metrics.jsonl, the process logs and TensorBoard's event files
write through: appended at once on a local disk; on an object store (no append) the whole object
is rewritten, with what it held before, at flush and close and at most every `rewrite_secs`."""

from clip_jax.infra import paths


def test_a_local_file_is_appended_at_once(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("before\n")
    file = paths.Appender(str(target), rewrite_secs=30.0)
    file.write("one\n")
    assert target.read_text() == "before\none\n"  # no flush needed
    file.write("two\n")
    file.close()
    assert target.read_text() == "before\none\ntwo\n"


def test_an_object_is_rewritten_whole_with_what_it_held(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(paths.time, "monotonic", lambda: clock[0])
    target = tmp_path / "b.txt"
    target.write_text("from before\n")
    file = paths.Appender(str(target), rewrite_secs=30.0, remote=True)
    file.write("first\n")  # the first write shows at once
    assert target.read_text() == "from before\nfirst\n"
    clock[0] += 10
    file.write("second\n")
    assert target.read_text() == "from before\nfirst\n"  # not yet
    clock[0] += 25
    file.write("third\n")  # 35 s after the last rewrite
    assert target.read_text() == "from before\nfirst\nsecond\nthird\n"
    file.write("last\n")
    file.close()
    assert target.read_text().endswith("third\nlast\n")
    file.close()  # closing twice is harmless


def test_binary_objects_are_rewritten_only_when_flushed(tmp_path):
    target = tmp_path / "sub" / "events.bin"
    file = paths.Appender(str(target), binary=True, remote=True)
    assert file.write(b"\x00\x01") == 2
    assert not target.exists()
    file.flush()
    assert target.read_bytes() == b"\x00\x01"
    file.write(bytearray(b"\x02"))
    file.close()
    assert target.read_bytes() == b"\x00\x01\x02" and file.closed
    assert not hasattr(file, "fileno")  # writers must not fsync it
