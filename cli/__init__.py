"""The `fescale` command line: the composition root on top of every layer (nothing imports it)."""
