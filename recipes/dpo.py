"""DPO: `python -m recipes.dpo [--config recipes/configs/dpo.yaml] [dotted.key=value ...]`."""

from pathlib import Path

from actors.launch import main

if __name__ == "__main__":
    main(str(Path(__file__).with_name("configs") / "dpo.yaml"))
