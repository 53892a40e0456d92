"""Suite-wide settings: no model hub, the repo root importable, deterministic CPU math."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails at once instead of hanging
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
