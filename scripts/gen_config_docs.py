"""Write docs/config.md, the configuration reference, from the models in rlhf/config.py.

python scripts/gen_config_docs.py            # rewrite docs/config.md
python scripts/gen_config_docs.py --check    # exit 1 if docs/config.md is out of date
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's rlhf, whichever environment runs the script

from rlhf.config_docs import DOC_PATH, REGENERATE, render_reference, undescribed_fields  # noqa: E402


def main() -> int:
    path, text = ROOT / DOC_PATH, render_reference()
    missing = undescribed_fields()
    if missing:
        print(f"{len(missing)} field(s) have no description:\n  " + "\n  ".join(missing), file=sys.stderr)
    if "--check" in sys.argv[1:]:
        if not path.is_file() or path.read_text() != text:
            print(f"{DOC_PATH} is out of date: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
