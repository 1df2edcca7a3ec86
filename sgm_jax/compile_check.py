"""`python -m sgm_jax.compile_check --config CFG --topology v5p:2x2x2 [...]` (see sgm_jax.cli.compile_check)."""

from sgm_jax.cli.compile_check import main

if __name__ == "__main__":
    main()
