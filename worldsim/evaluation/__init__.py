"""Measurements of trained world models against real data (`worldsim eval ...`).

Deliberately imports nothing: each module pulls in torch / the dataset readers itself, so the CLI
can list the commands without loading them.
"""
