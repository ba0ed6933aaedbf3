"""The benchmarks' one writer of a marked region of a markdown file (bench.common)."""

import pytest

from bench.common import check_region_target, write_region


def test_write_region_replaces_creates_and_appends(tmp_path):
    path = tmp_path / "new.md"  # missing: created
    write_region(path, "t", "| a |\n")
    assert path.read_text() == "<!-- t:start -->\n| a |\n<!-- t:end -->\n"
    path.write_text("intro\n\n" + path.read_text() + "\noutro\n")
    write_region(path, "t", "| b |")  # replaced in place, the prose kept
    assert path.read_text() == "intro\n\n<!-- t:start -->\n| b |\n<!-- t:end -->\n\noutro\n"
    write_region(path, "u", "x")  # a region the file lacks: appended
    text = path.read_text()
    assert text.endswith("outro\n\n<!-- u:start -->\nx\n<!-- u:end -->\n")
    assert text.count("<!-- t:start -->") == 1


def test_an_unwritable_target_is_refused_before_the_run(tmp_path):
    check_region_target(tmp_path / "fine.md")
    with pytest.raises(SystemExit, match="not a file in an existing folder"):
        check_region_target(tmp_path / "missing" / "x.md")
    with pytest.raises(SystemExit, match="not a file"):
        check_region_target(tmp_path)
