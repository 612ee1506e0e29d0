"""``metaqsm --help`` and the parser, without running anything."""
import re

from metaqsm_bids.cli.parser import build_parser


def test_help_names_each_default_once():
    text = build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in re.split(r"\n  (?=-)", text):  # one chunk per option
        assert len(re.findall(r"default", option)) <= 1, option
    flat = " ".join(text.split())
    for words in ("default: all", "(default: 0.2)", "(default: pdf)", "default: ./work", "default: orig"):
        assert words in flat, words


def test_network_data_consistency_default_and_off(tmp_path):
    from metaqsm_bids.qsm.inversion.consistency import DEFAULT_LAMBDA
    parser = build_parser()
    base = [str(tmp_path), str(tmp_path / "out"), "participant"]
    assert parser.parse_args(base).network_data_consistency == DEFAULT_LAMBDA
    assert parser.parse_args(base + ["--network-data-consistency", "0.3"]).network_data_consistency == 0.3
    assert parser.parse_args(base + ["--network-data-consistency", "0"]).network_data_consistency is None
    for bad in ("-1", "inf", "nan"):
        try:
            parser.parse_args(base + ["--network-data-consistency", bad])
        except SystemExit:
            continue
        raise AssertionError(f"{bad} accepted")


def test_network_tv_refinement_count_or_off(tmp_path):
    # a parameter checked as count_or_off parses to an int, 0 to None (off), and refuses negatives and fractions
    from metaqsm_bids.qsm.inversion.tv import DEFAULT_TV_REFINEMENT
    parser = build_parser()
    base = [str(tmp_path), str(tmp_path / "out"), "participant"]
    assert parser.parse_args(base).network_tv_refinement == DEFAULT_TV_REFINEMENT
    assert parser.parse_args(base + ["--network-tv-refinement", "3"]).network_tv_refinement == 3
    assert parser.parse_args(base + ["--network-tv-refinement", "0"]).network_tv_refinement is None
    for bad in ("-1", "1.5", "x"):
        try:
            parser.parse_args(base + ["--network-tv-refinement", bad])
        except SystemExit:
            continue
        raise AssertionError(f"{bad} accepted")


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
