"""What every benchmark script sets first: offline hubs, quiet tokenizers, the repo importable, the data folder."""

import os
import sys
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("SAEFEAT_DATA_DIR", REPO.parent / "shared" / "data"))
