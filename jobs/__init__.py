"""Thin command-line entry points: parse a config, connect to Ray, call one pipeline function."""
