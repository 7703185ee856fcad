"""Benchmarks of ai_guard beside the libraries users would otherwise pick.

Run every case: ``python -m benchmarks`` (``--quick`` for a smoke run, ``-k breaker`` to
select groups). Needs the ``bench`` extra: ``pip install -e ".[bench]"``.
"""
