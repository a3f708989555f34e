"""Kernels for Hopper GPUs (sm_90) in Gluon, Triton's lower-level dialect: warp-specialized
pipelines that plain `tl.*` code cannot express there. Imported only where
`compat.SUPPORTED` (the Triton version has the Gluon API they use)."""
