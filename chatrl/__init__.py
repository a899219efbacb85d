"""chatrl: the InstructGPT recipe (SFT -> reward model -> PPO) in one command."""

__version__ = "0.1.0"
