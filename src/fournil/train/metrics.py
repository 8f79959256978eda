"""What a run logs: ``metrics.jsonl`` always (one JSON record per line), TensorBoard too when asked."""
from __future__ import annotations

import json
from pathlib import Path

from fournil.errors import FournilError
from fournil.runs import METRICS


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / METRICS
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FournilError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.board:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(key, value, record["step"])

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def truncate(self, step: int) -> None:
        """Forget what a killed run logged after its last checkpoint (everything, if it wrote none: ``step`` 0): those
        steps run again, and so does a fine-tuning run's scoring of its base model, logged at step 0."""
        if self.path.exists():
            lines = self.path.read_text().splitlines() if step else []
            keep = [line for line in lines if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.board:
            self.board.close()
