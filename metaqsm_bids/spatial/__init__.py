"""Spatial normalisation: derivatives resampled to templateflow templates (``space-<template>``)."""
from .template import DEFAULT_TEMPLATE, check_output_spaces, parse_output_space, to_template

__all__ = ["DEFAULT_TEMPLATE", "check_output_spaces", "parse_output_space", "to_template"]
