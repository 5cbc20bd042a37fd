"""Verifiers: sampling policy, verifier assignment, re-scoring, the checks and verdicts.

Imports the core (`gonka_hpc`); the core never imports this package.
"""
