"""hostagent.conf: NAME.conf read without a shell, edited without losing anything."""

from __future__ import annotations

import os
import resource
import stat

import pytest

from hostagent import conf as conflib
from hostagent.caps import CAPS, DEFAULT_CEILING
from hostagent.conf import (
    KNOWN_KEYS,
    ConfigError,
    GuestConf,
    GuestSettings,
    render_new,
    settings,
    settings_from_file,
)
from hostagent.ulimit import Limit

PATH = "/etc/vservers/web.conf"

# The seed's template (util-vserver scripts/legacy/vserver, `build`) once its
# PROFILE case block is flattened, plus a `# Description:` as vserver-stat read it.
SEED_CONF = """\
# Description: the company web server
# Select the IP number assigned to the virtual server
IPROOT=1.2.3.4
#IPROOTMASK=
#IPROOTDEV=eth0
S_HOSTNAME=
# Uncomment the onboot line if you want to enable this
ONBOOT=yes
S_DOMAINNAME=
S_NICE=
S_FLAGS="lock nproc"
ULIMIT="-HS -u 1000"
S_CAPS=""
#S_CONTEXT=
"""


def parse(text: str) -> GuestConf:
    return GuestConf.parse(text, PATH)


def settings_of(text: str) -> GuestSettings:
    return settings(parse(text))


def refused(text: str) -> ConfigError:
    """The ConfigError that parsing TEXT and validating its settings raises."""
    with pytest.raises(ConfigError) as exc:
        settings_of(text)
    return exc.value


# --- ConfigError -----------------------------------------------------------


def test_config_error_names_path_line_and_key():
    e = ConfigError("bad", path="/x.conf", line=3, key="IPROOT")
    assert str(e) == "/x.conf:3: IPROOT: bad"
    assert (e.path, e.line, e.key, e.message) == ("/x.conf", 3, "IPROOT", "bad")
    assert isinstance(e, ValueError)


def test_config_error_without_line_or_key_leaves_them_out():
    assert str(ConfigError("bad", path="/x.conf")) == "/x.conf: bad"
    assert str(ConfigError("bad", path="/x.conf", key="K")) == "/x.conf: K: bad"
    assert str(ConfigError("bad", path="/x.conf", line=2)) == "/x.conf:2: bad"


# --- the grammar ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ('KEY="a b"', "a b"),
        ("KEY='a b'", "a b"),
        ("KEY=abc", "abc"),
        ("KEY=eth0:1.2.3.4/24", "eth0:1.2.3.4/24"),
        ("KEY=!CAP_SYS_CHROOT", "!CAP_SYS_CHROOT"),
        ("KEY=", ""),
        ('KEY=""', ""),
        ("KEY=''", ""),
        ("KEY= # empty, then a comment", ""),
        ('KEY="a" # trailing comment', "a"),
        ("KEY='a'\t# trailing comment", "a"),
        ("KEY=a # trailing comment", "a"),
        ('KEY="a"   ', "a"),
        ('  KEY="indented"', "indented"),
        ('KEY="\\"q\\" \\\\ \\$HOME"', '"q" \\ $HOME'),
        ("KEY='$HOME `x` \\n'", "$HOME `x` \\n"),
        ('KEY="# not a comment"', "# not a comment"),
        ('KEY="tab\there"', "tab\there"),
        ('KEY="café ünïcode"', "café ünïcode"),
        ("_KEY_2=x", "x"),
    ],
)
def test_value_forms_of_the_seed_are_read(line, value):
    key = line.strip().split("=", 1)[0]
    assert parse(line + "\n").get(key) == value


def test_comments_and_blank_lines_are_not_keys():
    c = parse("# a comment\n\n   \n\t# indented comment\n#!/bin/sh\nA=1\n")
    assert c.keys() == ["A"]


def test_empty_file_has_no_keys():
    assert parse("").keys() == []
    assert parse("").dump() == ""


def test_last_line_without_newline_is_read():
    assert parse("A=1\nB=2").get("B") == "2"


def test_duplicate_key_last_one_wins_on_read():
    c = parse("A=1\nB=x\nA=2\n")
    assert c.get("A") == "2"
    assert c.line_of("A") == 3
    assert c.keys() == ["A", "B"]


def test_get_default_and_contains():
    c = parse("A=1\n")
    assert c.get("MISSING") is None
    assert c.get("MISSING", "d") == "d"
    assert "A" in c
    assert "MISSING" not in c
    assert c.line_of("MISSING") is None


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        ("S_HOSTNAME=$(id)\n", 1, "S_HOSTNAME", "command substitution"),
        ('S_HOSTNAME="$(id)"\n', 1, "S_HOSTNAME", "command substitution"),
        ("S_HOSTNAME=`id`\n", 1, "S_HOSTNAME", "command substitution"),
        ('S_HOSTNAME="`id`"\n', 1, "S_HOSTNAME", "command substitution"),
        ("IPROOT=$IP\n", 1, "IPROOT", "variable expansion"),
        ('IPROOT="${IP}"\n', 1, "IPROOT", "variable expansion"),
        ('A=1\nIPROOT="1.2.3.4\n', 2, "IPROOT", "unterminated double quote"),
        ("IPROOT='1.2.3.4\n", 1, "IPROOT", "unterminated single quote"),
        ('IPROOT="a\\\n', 1, "IPROOT", "backslash at the end of a line"),
        ('IPROOT="a\\nb"\n', 1, "IPROOT", "backslash escape \\n is not allowed"),
        ('IPROOT="a\\`b"\n', 1, "IPROOT", "backslash escape \\` is not allowed"),
        ("IPROOT=a\\ b\n", 1, "IPROOT", "character '\\\\' is not allowed"),
        ("S_HOSTNAME=~/x\n", 1, "S_HOSTNAME", "character '~' is not allowed"),
        ("S_HOSTNAME=a;reboot\n", 1, "S_HOSTNAME", "character ';' is not allowed"),
        ("S_HOSTNAME=a*\n", 1, "S_HOSTNAME", "character '*' is not allowed"),
        ("S_HOSTNAME=a#b\n", 1, "S_HOSTNAME", "character '#' is not allowed"),
        ('S_HOSTNAME=a"b"\n', 1, "S_HOSTNAME", "quotes must enclose the whole value"),
        ("S_HOSTNAME=a b\n", 1, "S_HOSTNAME", "a value with spaces needs quotes"),
        ("S_HOSTNAME= reboot\n", 1, "S_HOSTNAME", "a value with spaces needs quotes"),
        ('S_HOSTNAME="a" b\n', 1, "S_HOSTNAME", "only a # comment may follow"),
        ('S_HOSTNAME="a"b\n', 1, "S_HOSTNAME", "right after the closing quote"),
        ("S_HOSTNAME='a'\"b\"\n", 1, "S_HOSTNAME", "right after the closing quote"),
        ('S_HOSTNAME="a";reboot\n', 1, "S_HOSTNAME", "right after the closing quote"),
        ("s_hostname=web\n", 1, "s_hostname", "keys are upper case"),
        ("S_Hostname=web\n", 1, "S_Hostname", "keys are upper case"),
        ("1KEY=web\n", 1, "1KEY", "invalid key"),
        ("MY-KEY=web\n", 1, "MY-KEY", "invalid key"),
        ("KEY+=web\n", 1, "KEY+", "invalid key"),
        ("S_HOSTNAME =web\n", 1, "S_HOSTNAME", "no spaces are allowed around '='"),
    ],
)
def test_malformed_line_is_refused_naming_file_line_and_key(text, line, key, message):
    with pytest.raises(ConfigError) as exc:
        parse(text)
    e = exc.value
    assert (e.path, e.line, e.key) == (PATH, line, key)
    assert message in e.message
    assert str(e).startswith(f"{PATH}:{line}: {key}: ")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("reboot\n", 1, "expected KEY="),
        ("=value\n", 1, "expected KEY="),
        ("echo a=b\n", 1, "expected KEY="),
        ("A=1\nexport A=2\n", 2, "shell syntax (export)"),
        ('if [ "$PROFILE" = "" ] ; then\n', 1, "shell syntax (if)"),
        ("case $PROFILE in\n", 1, "shell syntax (case)"),
        ("# c\nprod)\n", 2, "shell syntax (prod))"),
        ("\t;;\n", 1, "shell syntax (;;)"),
        (". /etc/other.conf\n", 1, "shell syntax (.)"),
        ("A=1\nB=2\0\n", 2, "NUL byte"),
        ('A="1"\r\n', 1, "carriage return"),
        ("A=1\nB=2\nreboot", 3, "expected KEY="),
    ],
)
def test_a_line_that_is_not_an_assignment_is_refused_naming_file_and_line(text, line, message):
    with pytest.raises(ConfigError) as exc:
        parse(text)
    e = exc.value
    assert (e.path, e.line, e.key) == (PATH, line, None)
    assert message in e.message
    assert str(e).startswith(f"{PATH}:{line}: ")


def test_the_seed_s_unflattened_profile_template_is_refused_at_its_first_shell_line():
    text = 'if [ "$PROFILE" = "" ] ; then\n\tPROFILE=prod\nfi\n'
    with pytest.raises(ConfigError, match=r":1: shell syntax \(if\).*PROFILE"):
        parse(text)


# --- load ---------------------------------------------------------------------


def test_load_reads_the_file_and_names_it_in_errors(tmp_path):
    f = tmp_path / "web.conf"
    f.write_text('S_HOSTNAME="web"\nIPROOT=$(ip)\n')
    with pytest.raises(ConfigError) as exc:
        GuestConf.load(f)
    assert (exc.value.path, exc.value.line, exc.value.key) == (str(f), 2, "IPROOT")


def test_load_refuses_a_file_that_is_not_utf8_naming_the_line(tmp_path):
    f = tmp_path / "web.conf"
    f.write_bytes(b'A=1\nB=2\nDESCRIPTION="caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"web\.conf:3: not valid UTF-8"):
        GuestConf.load(f)


def test_load_refuses_a_huge_file(tmp_path):
    f = tmp_path / "web.conf"
    f.write_bytes(b"# " + b"x" * conflib.MAX_CONF_BYTES + b"\n")
    with pytest.raises(ConfigError, match="larger than"):
        GuestConf.load(f)


def test_load_of_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        GuestConf.load(tmp_path / "missing.conf")


# --- editing and saving -----------------------------------------------------


def test_load_and_save_without_change_is_byte_for_byte(tmp_path):
    text = SEED_CONF + "UNKNOWN_KEY='kept'   # odd spacing\n\n  INDENTED=1\nLAST=\"no newline\""
    src = tmp_path / "a.conf"
    src.write_text(text)
    dst = tmp_path / "b.conf"
    GuestConf.load(src).save(dst)
    assert dst.read_text() == text


def test_comments_and_unknown_keys_survive_a_rewrite(tmp_path):
    f = tmp_path / "web.conf"
    f.write_text(SEED_CONF + "PROFILE_NOTE='x'  # ours\n")
    c = GuestConf.load(f)
    c.set("S_HOSTNAME", "web1")
    c.save(f)
    before = (SEED_CONF + "PROFILE_NOTE='x'  # ours\n").splitlines(keepends=True)
    after = f.read_text().splitlines(keepends=True)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [5]
    # The seed wrote it unquoted, so the new value stays unquoted.
    assert after[5] == "S_HOSTNAME=web1\n"


def test_set_keeps_the_trailing_comment_and_indentation():
    c = parse('  S_HOSTNAME="old"   # the name\n')
    c.set("S_HOSTNAME", "new")
    assert c.dump() == '  S_HOSTNAME="new"   # the name\n'


def test_set_keeps_the_quoting_style_when_it_can():
    c = parse("A=old\nB='old'\nC=\"old\"\n")
    c.set("A", "new")
    c.set("B", "new $x")
    c.set("C", "new")
    assert c.dump() == "A=new\nB='new $x'\nC=\"new\"\n"


def test_set_quotes_a_value_that_cannot_stand_unquoted():
    c = parse("A=old # c\n")
    c.set("A", "two words")
    assert c.dump() == 'A="two words" # c\n'
    c.set("A", "")
    assert c.dump() == 'A="" # c\n'


def test_set_leaves_single_quotes_for_a_value_with_an_apostrophe():
    c = parse("A='old'\n")
    c.set("A", "it's")
    assert c.dump() == 'A="it\'s"\n'


def test_set_appends_a_missing_key():
    c = parse("# head\nA=1\n")
    c.set("B", "2")
    assert c.dump() == '# head\nA=1\nB="2"\n'


def test_set_appends_after_a_last_line_without_newline():
    c = parse("A=1")
    c.set("B", "2")
    assert c.dump() == 'A=1\nB="2"\n'


def test_set_on_a_duplicate_key_rewrites_the_last_one():
    c = parse("A=1\nA=2\n")
    c.set("A", "3")
    assert c.dump() == "A=1\nA=3\n"
    assert c.get("A") == "3"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain",
        "two words",
        'say "hi"',
        "back\\slash",
        "$HOME",
        "`id`",
        "it's",
        "#hash",
        " spaced ",
        "tab\there",
        "café",
        "!CAP_SYS_CHROOT",
        "-H -u 1000",
    ],
)
def test_any_settable_value_reads_back_the_same(value, tmp_path):
    for start in ("A=x\n", "A='x'\n", 'A="x"\n', ""):
        c = parse(start)
        c.set("A", value)
        f = tmp_path / "a.conf"
        c.save(f)
        assert GuestConf.load(f).get("A") == value


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("a\nb", "newline"),
        ("a\rb", "carriage return"),
        ("a\0b", "NUL"),
        ("a\udcffb", "valid Unicode"),
        ("`it's`", "both ` and '"),
    ],
)
def test_a_value_that_cannot_be_written_is_refused(value, what, tmp_path):
    f = tmp_path / "web.conf"
    f.write_text("DESCRIPTION='old'\n")
    c = GuestConf.load(f)
    with pytest.raises(ConfigError, match=what) as exc:
        c.set("DESCRIPTION", value)
    assert (exc.value.key, exc.value.line) == ("DESCRIPTION", 1)
    c.save(f)
    assert f.read_text() == "DESCRIPTION='old'\n"


def test_a_value_that_cannot_be_written_is_refused_for_a_new_key_too():
    c = parse("")
    with pytest.raises(ConfigError, match="newline") as exc:
        c.set("DESCRIPTION", "a\nb")
    assert (exc.value.key, exc.value.line) == ("DESCRIPTION", None)
    assert c.dump() == ""


@pytest.mark.parametrize("key", ["lower", "1A", "A-B", "", "A B", "A\nB=1"])
def test_set_refuses_an_invalid_key(key):
    c = parse("")
    with pytest.raises(ConfigError, match="invalid key"):
        c.set(key, "x")
    assert c.dump() == ""


def test_unset_removes_every_assignment_of_the_key():
    c = parse("A=1\n# keep\nB=2\nA=3\n")
    assert c.unset("A") is True
    assert c.dump() == "# keep\nB=2\n"
    assert c.unset("A") is False


def test_save_writes_mode_0644_and_leaves_no_temporary_file(tmp_path):
    f = tmp_path / "web.conf"
    old_umask = os.umask(0o077)
    try:
        parse("A=1\n").save(f)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.conf"]


def test_save_replaces_the_file_atomically(tmp_path, monkeypatch):
    f = tmp_path / "web.conf"
    f.write_text("A=old\n")
    c = GuestConf.load(f)
    c.set("A", "new")

    def fail(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(conflib.os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        c.save(f)
    # The old file is whole and the temporary file is gone.
    assert f.read_text() == "A=old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.conf"]
    monkeypatch.undo()
    c.save(f)
    assert f.read_text() == "A=new\n"


def test_save_into_a_missing_directory_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError):
        parse("A=1\n").save(tmp_path / "missing" / "web.conf")


# --- settings ---------------------------------------------------------------


def test_an_empty_conf_has_the_defaults():
    s = settings_of("")
    assert s == GuestSettings()
    assert s.caps == DEFAULT_CEILING
    assert s.priority == 100
    assert s.stop_timeout == 10
    assert s.onboot is False
    assert s.context is None
    assert s.hostname is None
    assert s.domainname is None
    assert s.iproot == ()
    assert s.iproot_unrestricted is False


def test_empty_values_mean_the_defaults():
    text = "".join(f'{key}=""\n' for key in KNOWN_KEYS)
    assert settings_of(text) == GuestSettings()


def test_the_seed_s_flattened_template_reads():
    s = settings_of(SEED_CONF)
    assert s.iproot == ("1.2.3.4",)
    assert s.onboot is True
    assert s.flags == {"lock", "nproc"}
    assert s.ulimits == (Limit(resource.RLIMIT_NPROC, 1000, 1000),)
    assert s.caps == DEFAULT_CEILING
    assert s.caps_spec == ()
    assert s.description == "the company web server"


def test_settings_from_file(tmp_path):
    f = tmp_path / "web.conf"
    f.write_text('S_HOSTNAME="web1"\n')
    assert settings_from_file(f).hostname == "web1"


def test_settings_error_names_the_line_of_the_key(tmp_path):
    f = tmp_path / "web.conf"
    f.write_text('# head\nS_HOSTNAME="web1"\nS_NICE="99"\n')
    with pytest.raises(ConfigError) as exc:
        settings_from_file(f)
    assert str(exc.value) == f"{f}:3: S_NICE: '99' is not a whole number from -20 to 19"


# hostname and domainname


@pytest.mark.parametrize("name", ["web", "web-1", "1web", "web.example.com", "a" * 63, "W3B"])
def test_valid_hostnames(name):
    assert settings_of(f'S_HOSTNAME="{name}"').hostname == name


@pytest.mark.parametrize(
    "name",
    ["-web", "web-", "we_b", "web.", ".web", "we b", "a" * 64, "a." * 32 + "a", "wéb"],
)
def test_invalid_hostname_is_refused(name):
    e = refused(f'S_HOSTNAME="{name}"')
    assert (e.key, e.line) == ("S_HOSTNAME", 1)
    assert "host name" in e.message


def test_hostname_of_64_characters_is_the_uts_limit():
    longest = "a" * 30 + "." + "b" * 33
    assert len(longest) == 64
    assert settings_of(f'S_HOSTNAME="{longest}"').hostname == longest
    assert refused(f'S_HOSTNAME="{longest}c"').key == "S_HOSTNAME"


def test_domainname_none_clears_and_empty_keeps_the_host_s():
    assert settings_of('S_DOMAINNAME="none"').domainname == ""
    assert settings_of('S_DOMAINNAME=""').domainname is None
    assert settings_of('S_DOMAINNAME="corp.example"').domainname == "corp.example"


@pytest.mark.parametrize("name", ["bad domain", "a_b", "x" * 65, "-a"])
def test_invalid_domainname_is_refused(name):
    e = refused(f'S_DOMAINNAME="{name}"')
    assert (e.key, e.line) == ("S_DOMAINNAME", 1)


# IPROOT


@pytest.mark.parametrize(
    "value",
    [
        "1.2.3.4",
        "1.2.3.4 2.3.4.5",
        "eth0:1.2.3.4 eth1:5.6.7.8/255.255.255.0",
        "eth0.231:10.0.0.1/24",
        "fd00:db8::1",
        "fd00:db8::1/64",
        "eth0:fd00:db8::1/64",
        "fe80::1 10.0.0.1/32 10.0.0.2/0.0.0.0",
        "br-guests:192.168.0.1/255.255.255.255",
    ],
)
def test_valid_iproot_tokens(value):
    s = settings_of(f'IPROOT="{value}"')
    assert s.iproot == tuple(value.split())
    assert s.iproot_unrestricted is False


@pytest.mark.parametrize("value", ["ALL", "0.0.0.0"])
def test_all_and_0000_are_unrestricted(value):
    s = settings_of(f'IPROOT="{value}"')
    assert s.iproot_unrestricted is True
    assert s.iproot == ()


def test_empty_iproot_means_no_addresses_yet_not_unrestricted():
    s = settings_of('IPROOT=""')
    assert s.iproot == ()
    assert s.iproot_unrestricted is False


def test_sixteen_addresses_are_allowed():
    value = " ".join(f"10.0.0.{i}" for i in range(1, 17))
    assert len(settings_of(f'IPROOT="{value}"').iproot) == 16


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (" ".join(f"10.0.0.{i}" for i in range(1, 18)), "at most 16"),
        ("ALL 1.2.3.4", "cannot be combined"),
        ("1.2.3.4 0.0.0.0", "cannot be combined"),
        ("www.example.com", "is not an IPv4 or IPv6 address"),
        ("1.2.3", "is not an IPv4 or IPv6 address"),
        ("01.2.3.4", "is not an IPv4 or IPv6 address"),
        ("eth0:1.2.3.999", "'1.2.3.999' is not an IPv4 or IPv6 address"),
        ("eth0:", "'' is not an IPv4 or IPv6 address"),
        ("averylongdevicename:1.2.3.4", "invalid device name"),
        ("e@th0:1.2.3.4", "invalid device name"),
        ("eth/0:1.2.3.4", "is not an IPv4 or IPv6 address"),
        (".:1.2.3.4", "invalid device name"),
        (":1.2.3.4", "invalid device name"),
        ("fe80::1%eth0", "zone index"),
        ("1.2.3.4/33", "prefix length 33 is above 32"),
        ("fd00:db8::1/129", "prefix length 129 is above 128"),
        ("1.2.3.4/255.0.255.0", "not a prefix length or netmask"),
        ("1.2.3.4/0.0.0.255", "not a prefix length or netmask"),
        ("fd00:db8::1/ffff::", "not a prefix length or netmask"),
        ("1.2.3.4/", "not a prefix length or netmask"),
        ("1.2.3.4/x", "not a prefix length or netmask"),
        ("1.2.3.4 eth0:1.2.3.4/24", "listed twice"),
    ],
)
def test_invalid_iproot_is_refused(value, message):
    e = refused(f'A=1\nIPROOT="{value}"\n')
    assert (e.key, e.line) == ("IPROOT", 2)
    assert message in e.message


def test_iproot_device_mask_and_broadcast():
    s = settings_of('IPROOTDEV="eth0"\nIPROOTMASK="255.255.255.0"\nIPROOTBCAST="10.0.0.255"\n')
    assert (s.iprootdev, s.iprootmask, s.iprootbcast) == ("eth0", "255.255.255.0", "10.0.0.255")
    assert settings_of('IPROOTMASK="24"').iprootmask == "24"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("IPROOTDEV", "eth 0"),
        ("IPROOTDEV", "a" * 16),
        ("IPROOTDEV", "eth0:1"),
        ("IPROOTMASK", "255.0.255.0"),
        ("IPROOTMASK", "33"),
        ("IPROOTMASK", "ffff::"),
        ("IPROOTBCAST", "10.0.0.256"),
        ("IPROOTBCAST", "fd00:db8::ff"),
    ],
)
def test_invalid_iproot_device_mask_or_broadcast_is_refused(key, value):
    e = refused(f'{key}="{value}"')
    assert (e.key, e.line) == (key, 1)


# booleans


@pytest.mark.parametrize(
    ("value", "expected"),
    [("yes", True), ("YES", True), ("true", True), ("1", True), ("no", False),
     ("false", False), ("0", False), ("", False)],
)  # fmt: skip
def test_onboot_words(value, expected):
    assert settings_of(f'ONBOOT="{value}"').onboot is expected


@pytest.mark.parametrize("key", ["ONBOOT", "S_CAPS_UNSAFE"])
def test_a_bad_boolean_is_refused(key):
    e = refused(f'{key}="maybe"')
    assert (e.key, e.line) == (key, 1)
    assert "yes or no" in e.message


# capabilities


def test_s_caps_adds_and_removes():
    s = settings_of('S_CAPS="CAP_NET_RAW !CAP_SYS_CHROOT"')
    assert CAPS["CAP_NET_RAW"] in s.caps
    assert CAPS["CAP_SYS_CHROOT"] not in s.caps
    assert s.caps_spec == ("CAP_NET_RAW", "!CAP_SYS_CHROOT")


def test_granting_sys_admin_without_override_is_refused():
    e = refused('# head\nS_CAPS="CAP_SYS_ADMIN"\n')
    assert (e.key, e.line) == ("S_CAPS", 2)
    assert "CAP_SYS_ADMIN" in e.message
    assert 'S_CAPS_UNSAFE="yes"' in e.message


def test_granting_sys_admin_with_s_caps_unsafe_is_allowed():
    s = settings_of('S_CAPS="CAP_SYS_ADMIN"\nS_CAPS_UNSAFE="yes"\n')
    assert CAPS["CAP_SYS_ADMIN"] in s.caps
    assert s.caps_unsafe is True


def test_unknown_capability_in_s_caps_is_refused():
    e = refused('S_CAPS="CAP_NET_RAW CAP_FLY"')
    assert e.key == "S_CAPS"
    assert "'CAP_FLY'" in e.message


# numbers


@pytest.mark.parametrize(("value", "expected"), [("2", 2), ("49151", 49151), ("", None)])
def test_context_numbers(value, expected):
    assert settings_of(f'S_CONTEXT="{value}"').context == expected


@pytest.mark.parametrize("value", ["0", "1"])
def test_host_and_spectator_contexts_are_refused(value):
    e = refused(f'S_CONTEXT="{value}"')
    assert e.key == "S_CONTEXT"
    assert "0 is the host, 1 the spectator" in e.message


@pytest.mark.parametrize("value", ["49152", "-2", "two", "2.5", " 5", "01"])
def test_context_out_of_range_is_refused(value):
    e = refused(f'S_CONTEXT="{value}"')
    assert e.key == "S_CONTEXT"
    assert "from 2 to 49151" in e.message


@pytest.mark.parametrize(("value", "expected"), [("-20", -20), ("19", 19), ("0", 0), ("", None)])
def test_nice_values(value, expected):
    assert settings_of(f'S_NICE="{value}"').nice == expected


@pytest.mark.parametrize("value", ["-21", "20", "+5", "low"])
def test_nice_out_of_range_is_refused(value):
    assert refused(f'S_NICE="{value}"').key == "S_NICE"


def test_priority_and_stop_timeout():
    s = settings_of('PRIORITY="5"\nSTOP_TIMEOUT="0"\n')
    assert (s.priority, s.stop_timeout) == (5, 0)
    assert settings_of('PRIORITY="-1000"\nSTOP_TIMEOUT="3600"\n').stop_timeout == 3600


@pytest.mark.parametrize(
    ("key", "value"),
    [("PRIORITY", "1001"), ("PRIORITY", "first"), ("STOP_TIMEOUT", "3601"),
     ("STOP_TIMEOUT", "-1"), ("STOP_TIMEOUT", "10s")],
)  # fmt: skip
def test_priority_or_stop_timeout_out_of_range_is_refused(key, value):
    e = refused(f'{key}="{value}"')
    assert (e.key, e.line) == (key, 1)


# flags and ulimits


def test_every_seed_flag_is_accepted():
    s = settings_of('S_FLAGS="lock sched nproc private fakeinit hideinfo ulimit"')
    assert s.flags == conflib.FLAGS


@pytest.mark.parametrize("flag", ["minit", "LOCK", "virt_mem"])
def test_unknown_flag_is_refused(flag):
    e = refused(f'S_FLAGS="lock {flag}"')
    assert e.key == "S_FLAGS"
    assert repr(flag) in e.message


def test_ulimit_is_parsed():
    s = settings_of('ULIMIT="-S -n 1024 -H -n 4096"')
    assert s.ulimits == (Limit(resource.RLIMIT_NOFILE, 1024, 4096),)


def test_bad_ulimit_is_refused_naming_the_key():
    e = refused('ULIMIT="-H -u lots"')
    assert (e.key, e.line) == ("ULIMIT", 1)
    assert "bad value 'lots'" in e.message


# free text


def test_description_key_wins_over_the_seed_comment():
    s = settings_of('# Description: old\nDESCRIPTION="new"\n')
    assert s.description == "new"


def test_the_seed_description_comment_is_read_when_the_key_is_absent_or_empty():
    assert settings_of("#Description:  old text  \n").description == "old text"
    assert settings_of('# description: old\nDESCRIPTION=""\n').description == "old"
    assert settings_of("# Description:\n").description is None
    assert settings_of("# a comment\n").description is None


def test_control_characters_in_free_text_are_refused():
    e = refused('A=1\nDESCRIPTION="red \x1b[31m"\n')
    assert (e.key, e.line) == ("DESCRIPTION", 2)
    e = refused('BUILD_METHOD="x\x07"')
    assert e.key == "BUILD_METHOD"


def test_control_characters_in_the_seed_description_comment_are_refused():
    e = refused("A=1\n# Description: bell\x07\n")
    assert (e.key, e.line) == ("DESCRIPTION", 2)


def test_build_method_is_free_text():
    assert settings_of('BUILD_METHOD="debootstrap bookworm"').build_method == (
        "debootstrap bookworm"
    )


def test_unknown_keys_are_ignored_by_settings():
    assert settings_of('PROFILE="prod"\nMY_NOTE="x"\n') == GuestSettings()


# --- render_new -----------------------------------------------------------------


def test_a_fresh_conf_parses_back_to_the_same_settings():
    text = render_new(
        description='Web server "one" for $client',
        hostname="web1",
        domainname="corp.example",
        iproot=["eth0:10.0.0.2/24", "fd00:db8::2/64"],
        iprootdev="eth0",
        iprootmask="255.255.255.0",
        iprootbcast="10.0.0.255",
        onboot=True,
        priority=20,
        context=42,
        nice=5,
        caps=["CAP_NET_RAW", "!CAP_SYS_CHROOT"],
        flags=["lock", "nproc", "hideinfo"],
        ulimit="-H -n 4096",
        stop_timeout=30,
        build_method="debootstrap bookworm",
    )
    s = settings_of(text)
    assert s == GuestSettings(
        hostname="web1",
        domainname="corp.example",
        iproot=("eth0:10.0.0.2/24", "fd00:db8::2/64"),
        iprootdev="eth0",
        iprootmask="255.255.255.0",
        iprootbcast="10.0.0.255",
        onboot=True,
        priority=20,
        caps=(DEFAULT_CEILING | {CAPS["CAP_NET_RAW"]}) - {CAPS["CAP_SYS_CHROOT"]},
        caps_spec=("CAP_NET_RAW", "!CAP_SYS_CHROOT"),
        context=42,
        nice=5,
        flags=frozenset({"lock", "nproc", "hideinfo"}),
        ulimits=(Limit(resource.RLIMIT_NOFILE, None, 4096),),
        stop_timeout=30,
        description='Web server "one" for $client',
        build_method="debootstrap bookworm",
    )


def test_a_fresh_conf_with_defaults_writes_every_known_key_under_a_comment():
    text = render_new()
    c = parse(text)
    assert sorted(c.keys()) == sorted(KNOWN_KEYS)
    lines = text.splitlines()
    for key in KNOWN_KEYS:
        i = next(n for n, line in enumerate(lines) if line.startswith(f"{key}="))
        # Walk up over the other keys of the group to its comment.
        while lines[i - 1] and not lines[i - 1].startswith("#"):
            i -= 1
        assert lines[i - 1].startswith("#"), key
    assert settings(c) == GuestSettings(flags=frozenset(conflib.NEW_FLAGS))
    assert conflib.NEW_FLAGS == ("lock", "nproc")


def test_a_fresh_conf_can_clear_the_domainname_and_be_unrestricted():
    s = settings_of(render_new(domainname="", iproot=["ALL"]))
    assert s.domainname == ""
    assert s.iproot_unrestricted is True


def test_a_fresh_conf_without_flags_has_none():
    assert settings_of(render_new(flags=())).flags == frozenset()


def test_a_fresh_conf_with_unsafe_caps_needs_the_override():
    with pytest.raises(ConfigError, match="S_CAPS"):
        render_new(caps=["CAP_SYS_ADMIN"])
    s = settings_of(render_new(caps=["CAP_SYS_ADMIN"], caps_unsafe=True))
    assert CAPS["CAP_SYS_ADMIN"] in s.caps
    assert s.caps_unsafe is True


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"hostname": "bad host"}, "S_HOSTNAME"),
        ({"domainname": "bad domain"}, "S_DOMAINNAME"),
        ({"iproot": ["not-an-ip"]}, "IPROOT"),
        ({"iprootdev": "bad dev"}, "IPROOTDEV"),
        ({"context": 1}, "S_CONTEXT"),
        ({"nice": 40}, "S_NICE"),
        ({"priority": 5000}, "PRIORITY"),
        ({"flags": ["fly"]}, "S_FLAGS"),
        ({"ulimit": "-Z 1"}, "ULIMIT"),
        ({"stop_timeout": 9999}, "STOP_TIMEOUT"),
        ({"description": "line\nbreak"}, "DESCRIPTION"),
        ({"build_method": "a\x1bb"}, "BUILD_METHOD"),
    ],
)
def test_a_fresh_conf_with_a_bad_argument_is_refused_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as exc:
        render_new(**kwargs)
    assert exc.value.key == key


def test_module_exports_what_it_documents():
    for name in conflib.__all__:
        assert hasattr(conflib, name)
