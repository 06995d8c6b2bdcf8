"""configs/training/README.md states the parameter counts the library computes."""

import re
from pathlib import Path

from minilm.config import load_config
from minilm.counting import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_computed_counts():
    text = (ROOT / "configs" / "training" / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)\.json` \|(.*)$", text, flags=re.M)
    assert {name for name, _ in rows} == {p.stem for p in (ROOT / "configs" / "training").glob("*.json")}
    for name, rest in rows:
        cells = [c.strip() for c in rest.split("|")]
        cfg = load_config(ROOT / "configs" / "training" / f"{name}.json")
        pc = count_parameters(cfg)
        assert cells[6] == f"**{pc.total:,}**", name
        assert cells[7] == f"{pc.non_embedding:,}", name
        assert cells[9] == f"{cfg.tokens_per_step:,}", name
        assert cells[10] == f"{cfg.max_steps:,}", name
