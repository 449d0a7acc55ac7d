"""Where each stage reads and writes, relative to the project root (the paths dvc.yaml declares)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    """The paths of one project root; every stage reads and writes only these."""

    root: Path = Path(".")

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "dataset.h5"

    @property
    def teachers(self) -> Path:
        """Teachers from elsewhere (params gen0.source.weights): the folder the teacher stage depends on."""
        return self.root / "teachers"

    def model_dir(self, gen: int) -> Path:
        return self.root / "models" / f"gen-{gen}"

    def model(self, gen: int) -> Path:
        return self.model_dir(gen) / "model.pt"

    def train_state(self, gen: int) -> Path:
        """Per-epoch resume state: outside DVC's outputs, which DVC deletes before rerunning a stage."""
        return self.root / ".bancache" / "state" / f"gen-{gen}.pt"

    def store(self, gen: int) -> Path:
        return self.root / "cache" / f"gen-{gen}"

    def train_metrics(self, gen: int) -> Path:
        return self.root / "metrics" / "train" / f"gen-{gen}.json"

    def train_plot(self, gen: int) -> Path:
        return self.root / "plots" / "train" / f"gen-{gen}.csv"

    def inspect(self, gen: int, against: int | str | None = None) -> Path:
        """Folder of the audit of generation `gen`, or of its comparison with generation `against` (or with
        "teacher", its own teacher: `inspect/gen-K-vs-teacher`)."""
        name = f"gen-{gen}" if against is None else f"gen-{gen}-vs-{against}"
        return self.root / "inspect" / name

    def members(self, gen: int) -> Path:
        """The marker hashes of the stores generation `gen` learns from (dvc.yaml: train@K's dependency); not
        under `teachers/`, the teacher stage's dependency folder (a cycle)."""
        return self.root / "members" / f"gen-{gen}.json"

    def control_dir(self, gen: int) -> Path:
        """Folder of control-K (labels only, generation K's seed, weights and batch order)."""
        return self.root / "controls" / f"gen-{gen}"

    def control_model(self, gen: int) -> Path:
        return self.control_dir(gen) / "model.pt"

    def control_logits(self, gen: int) -> Path:
        """Control-K's test logits (float32, test rows in order): the report pairs them with BAN-K."""
        return self.control_dir(gen) / "test_logits.npy"

    def control_metrics(self, gen: int) -> Path:
        return self.control_dir(gen) / "metrics.json"

    @property
    def ensemble_metrics(self) -> Path:
        """Folder of the ensemble metrics: one <column>.json per generation and Ens*k (gen1.json, ens2.json)."""
        return self.root / "metrics" / "ensemble"

    @property
    def report(self) -> Path:
        return self.root / "reports" / "report.md"
