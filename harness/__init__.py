"""What the tests and the benchmarks share to drive the real bridge: the local Supabase stand-in
(``supabase_stub``) and ``python -m bridge serve`` as a subprocess (``processes``).

Neither is part of the bridge (not installed, not in the image); a package of its own so that
``bench/`` need not import ``tests/`` (docs/ARCHITECTURE.md, "Tests and benchmarks").
"""
