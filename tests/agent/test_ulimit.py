"""hostagent.ulimit: the seed's ULIMIT value, parsed like bash's ulimit and applied with prlimit."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hostagent.ulimit import RESOURCES, RLIMIT_LOCKS, Limit, UlimitError, apply, parse_ulimit

INF = resource.RLIM_INFINITY


def test_seed_template_sets_the_hard_process_limit_only():
    assert parse_ulimit("-H -u 1000") == [Limit(resource.RLIMIT_NPROC, None, 1000)]


def test_soft_only():
    assert parse_ulimit("-S -n 1024") == [Limit(resource.RLIMIT_NOFILE, 1024, None)]


def test_no_mode_sets_both_limits():
    assert parse_ulimit("-n 512") == [Limit(resource.RLIMIT_NOFILE, 512, 512)]


def test_mode_applies_to_the_options_that_follow_it():
    assert parse_ulimit("-S -n 1024 -H -n 4096") == [Limit(resource.RLIMIT_NOFILE, 1024, 4096)]


def test_mode_stays_until_the_next_mode_option():
    assert parse_ulimit("-H -n 10 -u 20") == [
        Limit(resource.RLIMIT_NOFILE, None, 10),
        Limit(resource.RLIMIT_NPROC, None, 20),
    ]


def test_h_and_s_together_set_both():
    assert parse_ulimit("-H -S -n 10") == [Limit(resource.RLIMIT_NOFILE, 10, 10)]
    assert parse_ulimit("-HS -n 10") == [Limit(resource.RLIMIT_NOFILE, 10, 10)]


def test_unlimited_is_rlim_infinity():
    assert parse_ulimit("-c unlimited") == [Limit(resource.RLIMIT_CORE, INF, INF)]


def test_several_resources_keep_their_order():
    assert parse_ulimit("-u 100 -n 512") == [
        Limit(resource.RLIMIT_NPROC, 100, 100),
        Limit(resource.RLIMIT_NOFILE, 512, 512),
    ]


def test_repeated_settings_of_one_resource_combine_and_the_later_wins():
    assert parse_ulimit("-n 100 -S -n 50") == [Limit(resource.RLIMIT_NOFILE, 50, 100)]
    assert parse_ulimit("-S -n 10 -S -n 20") == [Limit(resource.RLIMIT_NOFILE, 20, None)]


def test_empty_value_sets_nothing():
    assert parse_ulimit("") == []
    assert parse_ulimit("   ") == []


def test_getopt_forms_clustered_and_attached():
    assert parse_ulimit("-Hn 100") == [Limit(resource.RLIMIT_NOFILE, None, 100)]
    assert parse_ulimit("-n100") == [Limit(resource.RLIMIT_NOFILE, 100, 100)]


@pytest.mark.parametrize(
    ("letter", "rlimit", "factor"),
    [
        ("c", resource.RLIMIT_CORE, 1024),
        ("d", resource.RLIMIT_DATA, 1024),
        ("e", resource.RLIMIT_NICE, 1),
        ("f", resource.RLIMIT_FSIZE, 1024),
        ("i", resource.RLIMIT_SIGPENDING, 1),
        ("l", resource.RLIMIT_MEMLOCK, 1024),
        ("m", resource.RLIMIT_RSS, 1024),
        ("n", resource.RLIMIT_NOFILE, 1),
        ("q", resource.RLIMIT_MSGQUEUE, 1),
        ("r", resource.RLIMIT_RTPRIO, 1),
        ("R", resource.RLIMIT_RTTIME, 1),
        ("s", resource.RLIMIT_STACK, 1024),
        ("t", resource.RLIMIT_CPU, 1),
        ("u", resource.RLIMIT_NPROC, 1),
        ("v", resource.RLIMIT_AS, 1024),
        ("x", RLIMIT_LOCKS, 1),
    ],
)
def test_letters_and_units_follow_bash(letter, rlimit, factor):
    assert parse_ulimit(f"-{letter} 7") == [Limit(rlimit, 7 * factor, 7 * factor)]


def test_every_letter_is_tested_above():
    assert set(RESOURCES) == set("cdefilmnqrRstuvx")


def test_rlimit_locks_is_the_kernel_s_number():
    # include/uapi/asm-generic/resource.h
    assert RLIMIT_LOCKS == 10


def test_limit_names_the_resource():
    assert Limit(resource.RLIMIT_NOFILE, 1, 1).name == "nofile"
    assert Limit(999, 1, 1).name == "999"


@pytest.mark.parametrize("text", ["-z 10", "-a", "-p 8", "-n 10 -w 5"])
def test_unknown_option_is_refused(text):
    with pytest.raises(UlimitError, match="unknown option"):
        parse_ulimit(text)


@pytest.mark.parametrize("text", ["-n", "-n -u 10", "-H -u"])
def test_missing_value_is_refused(text):
    with pytest.raises(UlimitError, match="missing value"):
        parse_ulimit(text)


@pytest.mark.parametrize("value", ["12k", "0x10", "1.5", "hard", "soft", "+5", "ten"])
def test_bad_number_is_refused(value):
    with pytest.raises(UlimitError, match="bad value"):
        parse_ulimit(f"-n {value}")


def test_negative_value_is_refused():
    with pytest.raises(UlimitError, match="negative value '-5'"):
        parse_ulimit("-n -5")


def test_value_too_large_for_a_64_bit_limit_is_refused():
    with pytest.raises(UlimitError, match="too large"):
        parse_ulimit(f"-v {2**63 // 1024 + 1}")
    assert parse_ulimit(f"-n {2**63 - 1}") == [Limit(resource.RLIMIT_NOFILE, 2**63 - 1, 2**63 - 1)]


def test_soft_above_hard_is_refused():
    with pytest.raises(UlimitError, match="nofile soft limit 200 is above its hard limit 100"):
        parse_ulimit("-S -n 200 -H -n 100")


def test_unlimited_soft_above_a_numeric_hard_is_refused():
    with pytest.raises(
        UlimitError, match="core soft limit unlimited is above its hard limit 102400"
    ):
        parse_ulimit("-S -c unlimited -H -c 100")


def test_numeric_soft_below_unlimited_hard_is_fine():
    assert parse_ulimit("-S -c 0 -H -c unlimited") == [Limit(resource.RLIMIT_CORE, 0, INF)]


@pytest.mark.parametrize("text", ["100", "-n 10 20", "-"])
def test_bare_argument_is_refused(text):
    with pytest.raises(UlimitError, match="unexpected argument"):
        parse_ulimit(text)


def test_trailing_mode_option_is_refused():
    with pytest.raises(UlimitError, match="applies to no resource"):
        parse_ulimit("-n 10 -H")


def test_ulimit_error_is_a_value_error():
    assert issubclass(UlimitError, ValueError)


@pytest.fixture
def child() -> Iterator[int]:
    """A process of our own whose limits the tests may change freely."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_apply_sets_both_limits(child):
    apply([Limit(resource.RLIMIT_NOFILE, 64, 128)], pid=child)
    assert resource.prlimit(child, resource.RLIMIT_NOFILE) == (64, 128)


def test_apply_keeps_the_half_left_as_none(child):
    apply([Limit(resource.RLIMIT_NOFILE, 64, 128)], pid=child)
    apply([Limit(resource.RLIMIT_NOFILE, 32, None)], pid=child)
    assert resource.prlimit(child, resource.RLIMIT_NOFILE) == (32, 128)


def test_apply_lowers_the_soft_limit_to_a_new_lower_hard_limit(child):
    apply([Limit(resource.RLIMIT_NOFILE, 100, 100)], pid=child)
    apply([Limit(resource.RLIMIT_NOFILE, None, 50)], pid=child)
    assert resource.prlimit(child, resource.RLIMIT_NOFILE) == (50, 50)


def test_apply_clamps_a_soft_limit_above_the_current_hard_one(child):
    apply([Limit(resource.RLIMIT_NOFILE, 100, 100)], pid=child)
    apply([Limit(resource.RLIMIT_NOFILE, 200, None)], pid=child)
    assert resource.prlimit(child, resource.RLIMIT_NOFILE) == (100, 100)


def test_apply_a_parsed_value(child):
    apply(parse_ulimit("-S -n 20 -H -n 40 -c 0"), pid=child)
    assert resource.prlimit(child, resource.RLIMIT_NOFILE) == (20, 40)
    assert resource.prlimit(child, resource.RLIMIT_CORE) == (0, 0)


def test_apply_failure_says_what_it_was_setting():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    # The pid is reaped, so prlimit(2) fails with ESRCH.
    with pytest.raises(ProcessLookupError) as exc:
        apply([Limit(resource.RLIMIT_NOFILE, 10, 10)], pid=proc.pid)
    assert any("nofile" in note and str(proc.pid) in note for note in exc.value.__notes__)


def test_apply_failure_shows_a_half_left_alone_as_unchanged():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError) as exc:
        apply([Limit(resource.RLIMIT_CORE, None, 0)], pid=proc.pid)
    assert any("core to soft unchanged, hard 0" in note for note in exc.value.__notes__)
