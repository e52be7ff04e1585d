"""Agents (multi-turn episodes against an environment):
`python -m recipes.agent [--config recipes/configs/agent_calculator.yaml] [dotted.key=value ...]`."""

from pathlib import Path

from actors.launch import main

if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main(str(Path(__file__).with_name("configs") / "agent_calculator.yaml"))
