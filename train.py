"""Train a DDPM: `python train.py --help`, or `accelerate launch train.py ...` for several processes/GPUs."""

from hf_ddpm.training import main

if __name__ == "__main__":
    main()
