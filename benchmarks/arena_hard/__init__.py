"""Arena Hard for fescale: answers in arena-hard-auto's formats, a pairwise judge, its exact scores, sweeps."""
