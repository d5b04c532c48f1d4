import pytest

from katactl.errors import UsageError
from katactl.values import (format_cpulist, format_size, parse_cpulist, parse_duration,
                            parse_size)


@pytest.mark.parametrize("text,expected", [
    ("512Mi", 512 << 20), ("2G", 2 * 10**9), ("1.5Gi", 3 << 29), ("1073741824", 1 << 30),
    ("256M", 256 * 10**6), ("1GiB", 1 << 30), ("1GB", 10**9), ("4k", 4000), ("4Ki", 4096),
    (" 64Mi ", 64 << 20), ("1Ti", 1 << 40), ("100B", 100), ("1T", 10**12), ("1e9", 10**9), ("1E3", 1000),
    ("0.1Ki", 103), ("1gib", 1 << 30), ("512mb", 512 * 10**6),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "0", "-1G", "10Zi", "abc", "1.5", "Mi", "1 G i", "1e-3", "1e400", "nan",
                                 "inf", "0x10", "5 MiB extra", "99999999999Ei", "1,5G", "\x00", "１G"])
def test_parse_size_rejects(bad):
    with pytest.raises(UsageError) as e:
        parse_size(bad)
    assert "\n" not in str(e.value)


def test_zero_allowed_when_asked():
    assert parse_size("0", allow_zero=True) == 0


@pytest.mark.parametrize("n,text", [(512 << 20, "512Mi"), (3 << 29, "1.5Gi"), (100, "100B"), (None, "-")])
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("text,expected", [("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]), ("5", [5]),
                                           ("", []), ("3,1,1-2", [1, 2, 3])])
def test_parse_cpulist(text, expected):
    assert parse_cpulist(text) == expected
    assert parse_cpulist(format_cpulist(expected)) == expected


@pytest.mark.parametrize("bad", ["a", "1-", "-1", "3-1", "1,,2", "1-2-3", "99999", "0x1", "1 2",
                                 "9" * 5000, "0-" + "9" * 5000, "0," + "1" * 4301, "00000000001", "\u0661"])
def test_parse_cpulist_rejects(bad):
    with pytest.raises(UsageError) as e:
        parse_cpulist(bad)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("text,expected", [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25),
                                           ("10", 10), ("1.5", 1.5), ("1d", 86400)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["", "0", "-5s", "5x", "s", "1h-3m", "m5", "nan", "inf", "400d", "5 m",
                                 "1e3", "1_0", "１０", "1e-9"])
def test_parse_duration_rejects(bad):
    with pytest.raises(UsageError):
        parse_duration(bad)


def test_validators_full_match_no_trailing_newline():
    """issue 16 #4: '$' matches before a trailing newline; validation is a full match."""
    from katactl.upgrade.layout import validate_version
    from katactl.vmcore.capture import _check_sandbox_id

    for call, arg in [(validate_version, "1.0\n"), (_check_sandbox_id, "abc\n")]:
        with pytest.raises(UsageError):
            call(arg)


def test_parsers_full_match_no_trailing_newline():
    from katactl.isolation.threads import vcpu_index
    from katactl.vmcore.dumps import dump_timestamp

    assert vcpu_index("CPU 1/KVM", "qemu") == 1 and vcpu_index("CPU 1/KVM\n", "qemu") is None
    assert dump_timestamp("vmcore-20240101000000.elf") and dump_timestamp("vmcore-20240101000000.elf\n") is None


@pytest.mark.parametrize("text", ["1.5B", "1.5b", "0.5B", "2.25"])
def test_fractional_bytes_are_refused_with_or_without_b(text):
    """issue 16 #19: '--target 1.5B' became 2 bytes while '1.5' was refused."""
    with pytest.raises(UsageError, match="whole number"):
        parse_size(text, what="--target")
    assert parse_size("1.5Ki") == 1536 and parse_size("3B") == 3


@pytest.mark.parametrize("text,needle", [("256m", "m is milli in Kubernetes"), ("1K", "write Ki"),
                                         ("2g", "write Gi"), ("5u", "fraction of a byte")])
def test_ambiguous_units_are_refused_with_a_hint(text, needle):
    """Review 11 item 7: parse_size read M/G as binary and m as MiB; Kubernetes (and overhead's
    --runtime-class-overhead) reads M/G as decimal and m as milli. One reading now, Kubernetes',
    and the units it would read as something else are refused with the way out."""
    with pytest.raises(UsageError, match=needle) as e:
        parse_size(text, what="--target")
    assert "\n" not in str(e.value)


def test_one_reading_of_a_memory_size_everywhere():
    """--target and --runtime-class-overhead memory= read a size the same way: as the
    Kubernetes resource.Quantity a pod's `memory: 2G` is (apimachinery pkg/api/resource)."""
    from katactl import overhead

    for text in ("256M", "2G", "160Mi", "1e9", "1536Ki"):
        assert overhead.parse_declared(f"memory={text}")["memoryBytes"] == parse_size(text) \
            == overhead.memory_bytes(text)
    with pytest.raises(UsageError, match="milli"):
        overhead.parse_declared("cpu=250m,memory=256m")
    assert overhead.memory_bytes("256m") == 1  # a RuntimeClass's own quantity: as Kubernetes reads it


@pytest.mark.parametrize("text,why", [("1e99999999999", "exponent out of range"), ("1e400", "too large"),
                                      ("9" * 30 + "Ei", "too large")])
def test_a_size_out_of_range_says_so_not_which_forms_exist(text, why):
    """An exponent past Decimal's range got the quantity hint ('such as 250m, 0.5'), forms
    --target refuses (review 12)."""
    with pytest.raises(UsageError) as e:
        parse_size(text, what="--target")
    assert e.value.message == f"invalid --target {text!r}: {why}"
