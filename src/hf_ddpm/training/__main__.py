"""`python -m hf_ddpm.training --help`: the training command, for an installed package (train.py is the same entry
in a checkout)."""

from . import main

if __name__ == "__main__":
    main()
