"""Benchmarks of fnl_transformers: one script per question, ``python -m bench.run_all`` runs them all.

Each script compares against a baseline in the same process, alternating the two, and reports medians and
the ratio; ``bench/results.json`` and ``bench/results.md`` are written by :mod:`bench.run_all`.
"""
