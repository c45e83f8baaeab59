"""harness.launch.hostfile: parsing hostfiles line by line, include/exclude filters, slots vs world size."""

from __future__ import annotations

import pytest

from harness.errors import SpecError, SpecErrors
from harness.launch.hostfile import active_slots, check_world_size, parse_hostfile

pytestmark = pytest.mark.usefixtures("no_pwned")


def test_hostfile_parses_comments_blank_lines_and_crlf():
    hosts = parse_hostfile("# cluster\n\nnode1 slots=8  # first\r\nnode-2.example slots=4\n")
    assert [(h.host, h.slots, h.line) for h in hosts] == [("node1", 8, 3), ("node-2.example", 4, 4)]


@pytest.mark.parametrize(
    "line, words",
    [
        ("-oProxyCommand=touch_PWNED slots=1", "starting with '-'"),
        ("node$(touch PWNED) slots=1", "not allowed in a hostname"),
        ("node`id` slots=1", "not allowed in a hostname"),
        ("node;id slots=1", "not allowed in a hostname"),
        ("node'1 slots=1", "not allowed in a hostname"),
        ('node"1 slots=1', "not allowed in a hostname"),
        ("node:1 slots=1", "not allowed in a hostname"),
        ("node1 slots=0", "positive integer"),
        ("node1 slots=-2", "positive integer"),
        ("node1 slots=1.5", "positive integer"),
        ("node1 slots=eight", "positive integer"),
        ("node1 slots=", "positive integer"),
        ("node1", "no slots=N"),
        ("node1 slots=2 max_slots=4", "unexpected"),
        ("node1 gpus=2", "positive integer"),
    ],
)
def test_hostfile_errors_carry_the_line_number(line, words):
    with pytest.raises(SpecError) as err:
        parse_hostfile(f"# header\nok slots=1\n{line}\n", source="hf")
    assert "hf line 3" in err.value.message and words in err.value.message
    assert err.value.field == "launch.hostfile"


def test_hostfile_reports_every_problem_at_once_including_duplicates():
    text = "node1 slots=1\nnode2 slots=0\nnode1 slots=2\n-x slots=1\n"
    with pytest.raises(SpecErrors) as err:
        parse_hostfile(text, source="hf")
    message = err.value.message
    assert "3 problems" in message
    assert "hf line 2" in message and "hf line 3: duplicate host, already on line 1" in message
    assert "hf line 4" in message


def test_empty_hostfile_is_an_error():
    with pytest.raises(SpecError, match="no hosts"):
        parse_hostfile("# nothing\n\n")


def test_include_exclude_filter_hosts_and_slots():
    hosts = parse_hostfile("a slots=2\nb slots=2\nc slots=1\n")
    assert dict(active_slots(hosts, include="a@b:1")) == {"a": [0, 1], "b": [1]}
    assert dict(active_slots(hosts, exclude="b@a:0")) == {"a": [1], "c": [0]}
    assert dict(active_slots(hosts)) == {"a": [0, 1], "b": [0, 1], "c": [0]}


@pytest.mark.parametrize(
    "kw, field, words",
    [
        ({"include": "a@zz"}, "launch.include", "'zz' is not in the hostfile"),
        ({"exclude": "q:0"}, "launch.exclude", "'q' is not in the hostfile"),
        ({"include": "a:5"}, "launch.include", "no slot '5' on a"),
        ({"include": "a:x"}, "launch.include", "no slot 'x' on a"),
        ({"include": "a", "exclude": "b"}, "launch.include", "not both"),
        ({"include": "a\n$(touch PWNED)"}, "launch.include", "control character"),
    ],
)
def test_filters_naming_unknown_hosts_or_slots_are_refused(kw, field, words):
    hosts = parse_hostfile("a slots=2\nb slots=2\n")
    with pytest.raises(SpecError) as err:
        active_slots(hosts, **kw)
    assert err.value.field == field and words in err.value.message


def test_total_slots_must_equal_the_world_size():
    hosts = parse_hostfile("a slots=2\nb slots=2\n")
    check_world_size(active_slots(hosts), 4)
    with pytest.raises(SpecError) as err:
        check_world_size(active_slots(hosts, exclude="b:1"), 4)
    assert "3 slots (a:2 + b:1)" in err.value.message and "world size 4" in err.value.message
