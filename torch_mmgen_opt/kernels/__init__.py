"""kernels of torch_mmgen_opt."""
