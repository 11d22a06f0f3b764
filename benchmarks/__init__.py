"""Benchmarks: each ``bench_*.py`` measures one thing and writes JSON + a plot to ``benchmarks/results/``.

    python -m benchmarks.run_all --smoke        # every benchmark at smoke size, then the README table
    python -m benchmarks.bench_lori_params --help
"""
