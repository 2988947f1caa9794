"""Load benchmarks against the real server (``make bench``, ``python -m bench``); figures
are printed and written to bench/out/, nothing is asserted."""
