"""``metaqsm --help`` and the parser, without running anything."""
import re

import pytest

from metaqsm_bids.cli.parser import build_parser
from metaqsm_bids.qsm.inversion.consistency import DEFAULT_LAMBDA
from metaqsm_bids.qsm.inversion.tv import DEFAULT_TV_REFINEMENT


def test_help_names_each_default_once():
    text = build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in re.split(r"\n  (?=-)", text):  # one chunk per option
        assert len(re.findall(r"default", option)) <= 1, option
    flat = " ".join(text.split())
    for words in ("default: all", "(default: 0.2)", "(default: tfi)", "default: ./work", "default: orig"):
        assert words in flat, words


@pytest.mark.parametrize("option, default, value, parsed, bads", [
    # a positive_or_off weight: a float, 0 for off
    ("--network-data-consistency", DEFAULT_LAMBDA, "0.3", 0.3, ("-1", "inf", "nan")),
    # a count_or_off parameter: an int, 0 for off; negatives and fractions refused
    ("--network-tv-refinement", DEFAULT_TV_REFINEMENT, "3", 3, ("-1", "1.5", "x"))])
def test_off_options_default_value_and_off(tmp_path, option, default, value, parsed, bads):
    parser = build_parser()
    base = [str(tmp_path), str(tmp_path / "out"), "participant"]
    dest = option.lstrip("-").replace("-", "_")
    assert getattr(parser.parse_args(base), dest) == default
    assert getattr(parser.parse_args(base + [option, value]), dest) == parsed
    assert getattr(parser.parse_args(base + [option, "0"]), dest) is None
    for bad in bads:
        try:
            parser.parse_args(base + [option, bad])
        except SystemExit:
            continue
        raise AssertionError(f"{option} {bad} accepted")


def test_whole_number_parameters(tmp_path, capsys):
    # a parameter checked as positive_int (TV-ADMM's iterations) parses to an int and refuses 0 and fractions
    parser = build_parser()
    base = [str(tmp_path), str(tmp_path / "out"), "participant", "--inversion", "tv"]
    assert parser.parse_args(base).tv_iterations == 5
    parsed = parser.parse_args(base + ["--tv-iterations", "12"]).tv_iterations
    assert parsed == 12 and isinstance(parsed, int)
    for bad in ("0", "2.5", "x"):
        try:
            parser.parse_args(base + ["--tv-iterations", bad])
        except SystemExit:
            assert "must be a whole number > 0" in capsys.readouterr().err
            continue
        raise AssertionError(f"{bad} accepted")
