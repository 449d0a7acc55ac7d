"""Render every vega-lite chart of `dvc plots show --json` (or `dvc plots diff ... --json`), read on stdin,
to OUT/<plot id>.png. Needs `vl-convert-python`, which bancache does not depend on: install it in a venv of
its own (`python3 -m venv /tmp/vl && /tmp/vl/bin/pip install vl-convert-python`).

    dvc plots show --json | /tmp/vl/bin/python docs/img/plots/render.py docs/img/plots
"""

import json
import sys
from pathlib import Path

import vl_convert as vlc

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
text = sys.stdin.read()
for plot_id, items in json.loads(text[text.index("{") :])["data"].items():
    for item in items:
        if item.get("type") == "vega":
            path = out / f"{plot_id.replace('/', '_').removesuffix('.csv')}.png"
            path.write_bytes(vlc.vegalite_to_png(item["content"], scale=1.25))
            print(path)
