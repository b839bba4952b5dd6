"""The mathematics, no graphs: Hadamard matrices (and GF(p^k)), rotation kinds, quantizers, GPTQ."""
