"""jaxdl: a small, purely functional deep-learning toolkit on JAX.

`import jaxdl as dl`; every piece is a pure function of explicit values (params, model state,
optimizer state, a PRNG key, a step counter). See DESIGN.md for the public names.
"""
