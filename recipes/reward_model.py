"""Reward model: `python -m recipes.reward_model [--config recipes/configs/reward_model.yaml] [dotted.key=value ...]`."""

from pathlib import Path

from actors.launch import main

if __name__ == "__main__":
    main(str(Path(__file__).with_name("configs") / "reward_model.yaml"))
