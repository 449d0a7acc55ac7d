"""Thin DVC stage entry points: each parses its params sections and calls the library."""
