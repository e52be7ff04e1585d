"""PPO: `python -m recipes.ppo [--config recipes/configs/ppo.yaml] [dotted.key=value ...]`."""

from pathlib import Path

from actors.launch import main

if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main(str(Path(__file__).with_name("configs") / "ppo.yaml"))
