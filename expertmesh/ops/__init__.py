"""The per-layer ops of the data plane: each a plain-torch reference (the CPU path and the oracle) and a GPU
implementation (a Triton kernel or a torch built-in) behind one signature, one file per op."""
