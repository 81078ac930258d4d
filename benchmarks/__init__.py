"""Benchmarks: ``python -m benchmarks NAME`` runs ``benchmarks/NAME.py:main()``; ``all`` runs every one."""
