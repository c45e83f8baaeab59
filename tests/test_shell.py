"""harness.launch.shell: quoting for sh and the checks on values that reach a shell."""

from __future__ import annotations

import subprocess

import pytest
from helpers import CONTROL, INJECTIONS

from harness.errors import SpecError
from harness.launch.shell import quote, reject_control, require_plain

pytestmark = pytest.mark.usefixtures("no_pwned")


def test_quote_round_trips_every_injection_through_sh():
    for value in INJECTIONS:
        out = subprocess.run(["sh", "-c", f"printf %s {quote('f', value)}"], capture_output=True, text=True)
        assert out.stdout == value


@pytest.mark.parametrize("value", CONTROL)
def test_control_characters_are_refused_with_the_field(value):
    with pytest.raises(SpecError, match="control character") as err:
        reject_control("run.name", value)
    assert err.value.field == "run.name"


def test_require_plain_names_the_field_and_the_bad_characters():
    assert require_plain("f", "/runs/a-b_c.1", "why") == "/runs/a-b_c.1"
    with pytest.raises(SpecError) as err:
        require_plain("run.name", "/runs/a b$(x)", "the remote shell reads it")
    assert "run.name" in err.value.message and "$" in err.value.message
