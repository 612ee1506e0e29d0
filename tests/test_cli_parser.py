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
