"""fescale's benchmarks: Arena Hard, scaling sweeps and performance measurements."""
