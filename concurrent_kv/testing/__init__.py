"""Test and benchmark aids shipped with the library: models of old behaviour to compare against.

Nothing in the library proper imports this package; tests and benchmarks do.
"""
