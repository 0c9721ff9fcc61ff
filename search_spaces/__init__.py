"""Search spaces: operations, cells, supernets, evaluation networks, genotypes and counting."""
