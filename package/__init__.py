"""blastq: find leukaemic blast cells in blood-smear images.

The code lives in blastq.core, blastq.worker, blastq.trainer and blastq.cli (pyproject.toml maps the
folders); this package holds only `python -m blastq`.
"""
