"""hostagent.caps: capability names, the default ceiling and S_CAPS."""

from __future__ import annotations

import pytest

from hostagent import caps
from hostagent.caps import (
    CAPS,
    DEFAULT_CEILING,
    SECURE_DROP,
    SEED_SECURE_DROP,
    UNSAFE,
    CapabilityError,
    bounding_drop,
    cap_name,
    cap_number,
    ceiling,
    from_mask,
    last_cap,
    names,
    to_mask,
)


def test_numbers_match_the_kernel_header():
    assert CAPS["CAP_CHOWN"] == 0
    assert CAPS["CAP_NET_RAW"] == 13
    assert CAPS["CAP_SYS_ADMIN"] == 21
    assert CAPS["CAP_AUDIT_WRITE"] == 29
    assert CAPS["CAP_SETFCAP"] == 31
    assert CAPS["CAP_BPF"] == 39
    assert CAPS["CAP_CHECKPOINT_RESTORE"] == 40
    assert sorted(CAPS.values()) == list(range(41))


@pytest.mark.parametrize("spelling", ["CAP_NET_RAW", "NET_RAW", "net_raw", "cap_net_raw"])
def test_cap_number_accepts_kernel_short_and_lower_case_names(spelling):
    assert cap_number(spelling) == 13


@pytest.mark.parametrize("bad", ["CAP_NET_RAWX", "", "CAP_", "13", "NET RAW"])
def test_unknown_capability_name_is_refused_naming_it(bad):
    with pytest.raises(CapabilityError, match="unknown capability") as exc:
        cap_number(bad)
    assert repr(bad) in str(exc.value)


def test_cap_name_round_trips_every_number():
    for name, n in CAPS.items():
        assert cap_name(n) == name
        assert cap_number(name) == n


@pytest.mark.parametrize("bad", [-1, 41, 63])
def test_unknown_capability_number_is_refused(bad):
    with pytest.raises(CapabilityError, match=f"unknown capability number {bad}"):
        cap_name(bad)


def test_last_cap_reads_the_kernel_file(tmp_path):
    f = tmp_path / "cap_last_cap"
    f.write_text("43\n")
    assert last_cap(f) == 43


def test_last_cap_falls_back_to_the_table_when_the_file_is_missing(tmp_path):
    assert last_cap(tmp_path / "missing") == 40


def test_last_cap_falls_back_to_the_table_when_the_file_is_garbage(tmp_path):
    f = tmp_path / "cap_last_cap"
    f.write_text("forty\n")
    assert last_cap(f) == 40


def test_default_ceiling_is_docker_s_set_without_mknod_and_net_raw():
    assert names(DEFAULT_CEILING) == [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_AUDIT_WRITE",
        "CAP_SETFCAP",
    ]


def test_default_ceiling_holds_no_unsafe_capability():
    assert not DEFAULT_CEILING & UNSAFE.keys()


def test_unsafe_lists_the_five_host_reaching_caps_each_with_a_reason():
    assert set(names(UNSAFE)) == {
        "CAP_SYS_ADMIN",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_DAC_READ_SEARCH",
        "CAP_BPF",
    }
    assert all(reason.strip() for reason in UNSAFE.values())
    assert "CVE-2014-9357" in UNSAFE[CAPS["CAP_DAC_READ_SEARCH"]]


def test_secure_leaves_exactly_the_default_ceiling():
    assert frozenset(CAPS.values()) - SECURE_DROP == DEFAULT_CEILING
    assert not SECURE_DROP & DEFAULT_CEILING


def test_secure_drops_everything_the_seed_dropped_and_the_shocker_cap():
    assert SEED_SECURE_DROP <= SECURE_DROP
    for extra in ("CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE", "CAP_BPF", "CAP_SYS_BOOT"):
        assert CAPS[extra] in SECURE_DROP


def test_bounding_drop_covers_caps_newer_than_the_table():
    dropped = bounding_drop(DEFAULT_CEILING, last=42)
    assert {41, 42} <= dropped
    assert dropped == frozenset(range(43)) - DEFAULT_CEILING


def test_bounding_drop_defaults_to_the_running_kernel():
    assert max(bounding_drop(DEFAULT_CEILING)) == last_cap()


def test_empty_spec_gives_the_base():
    assert ceiling([]) == DEFAULT_CEILING


def test_adding_net_raw_and_removing_sys_chroot():
    result = ceiling(["CAP_NET_RAW", "!CAP_SYS_CHROOT"])
    assert CAPS["CAP_NET_RAW"] in result
    assert CAPS["CAP_SYS_CHROOT"] not in result
    assert result - {CAPS["CAP_NET_RAW"]} == DEFAULT_CEILING - {CAPS["CAP_SYS_CHROOT"]}


def test_spec_words_apply_in_order():
    assert CAPS["CAP_NET_RAW"] not in ceiling(["CAP_NET_RAW", "!CAP_NET_RAW"])
    assert CAPS["CAP_NET_RAW"] in ceiling(["!CAP_NET_RAW", "CAP_NET_RAW"])


def test_a_whole_s_caps_value_is_split_into_words():
    expected = ceiling(["CAP_NET_RAW", "!CAP_KILL"])
    assert ceiling("CAP_NET_RAW  !CAP_KILL") == expected
    assert ceiling(["CAP_NET_RAW !CAP_KILL"]) == expected


def test_spec_accepts_short_names():
    assert ceiling(["net_raw", "!sys_chroot"]) == ceiling(["CAP_NET_RAW", "!CAP_SYS_CHROOT"])


def test_custom_base():
    assert ceiling(["CAP_KILL"], base=frozenset()) == {CAPS["CAP_KILL"]}


def test_unknown_capability_in_spec_is_refused():
    with pytest.raises(CapabilityError, match="'CAP_NOPE'"):
        ceiling(["CAP_NOPE"])
    with pytest.raises(CapabilityError, match="'CAP_NOPE'"):
        ceiling(["!CAP_NOPE"])


def test_a_lone_bang_is_refused():
    with pytest.raises(CapabilityError, match="unknown capability"):
        ceiling(["!"])


def test_granting_sys_admin_without_override_is_refused():
    with pytest.raises(CapabilityError) as exc:
        ceiling(["CAP_SYS_ADMIN"])
    message = str(exc.value)
    assert "CAP_SYS_ADMIN" in message
    assert "mount, namespaces" in message
    assert 'S_CAPS_UNSAFE="yes"' in message
    assert "--allow-unsafe-caps" in message


@pytest.mark.parametrize("cap", sorted(UNSAFE))
def test_granting_any_unsafe_cap_without_override_is_refused_saying_why(cap):
    with pytest.raises(CapabilityError) as exc:
        ceiling([cap_name(cap)])
    assert cap_name(cap) in str(exc.value)
    assert UNSAFE[cap] in str(exc.value)


def test_granting_an_unsafe_cap_with_override_is_allowed():
    assert CAPS["CAP_SYS_ADMIN"] in ceiling(["CAP_SYS_ADMIN"], allow_unsafe=True)


def test_removing_an_unsafe_cap_needs_no_override():
    base = DEFAULT_CEILING | {CAPS["CAP_SYS_ADMIN"]}
    assert ceiling(["!CAP_SYS_ADMIN"], base=base) == DEFAULT_CEILING


def test_mask_round_trip():
    assert to_mask([]) == 0
    assert to_mask([0, 13]) == (1 << 0) | (1 << 13)
    assert from_mask(to_mask(DEFAULT_CEILING)) == DEFAULT_CEILING


def test_full_kernel_mask_decodes_to_every_cap():
    # /proc/self/status CapBnd of root on a 5.9+ kernel.
    assert from_mask(0x000001FFFFFFFFFF) == frozenset(range(41))


def test_from_mask_keeps_bits_newer_than_the_table():
    assert from_mask(1 << 45) == {45}


@pytest.mark.parametrize("bad", [-1, 64])
def test_to_mask_refuses_numbers_outside_64_bits(bad):
    with pytest.raises(CapabilityError, match="out of range"):
        to_mask([bad])


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_from_mask_refuses_values_outside_64_bits(bad):
    with pytest.raises(CapabilityError, match="not a 64-bit value"):
        from_mask(bad)


def test_names_are_sorted_by_number_and_deduplicated():
    assert names([13, 0, 13, 2]) == ["CAP_CHOWN", "CAP_DAC_READ_SEARCH", "CAP_NET_RAW"]


def test_names_show_caps_newer_than_the_table_as_numbers():
    assert names(from_mask(to_mask([40, 41, 42]))) == ["CAP_CHECKPOINT_RESTORE", "41", "42"]


def test_module_exports_what_it_documents():
    for name in caps.__all__:
        assert hasattr(caps, name)
