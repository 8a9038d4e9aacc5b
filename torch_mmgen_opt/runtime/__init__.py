"""runtime of torch_mmgen_opt."""
