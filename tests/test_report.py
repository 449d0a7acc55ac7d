"""The report table: ensemble metrics mapped to Table 2's columns, and the markdown table's order, means,
sample standard deviations and error mode, against hand-written expected text."""

from __future__ import annotations

from pipeline.results.columns import Column, Control, Ensemble, Generation, LossVariant
from pipeline.results.tables import chain_columns, format_table

TEACHER, BAN1, BAN2, ENS2, ENS3 = Generation(0), Generation(1), Generation(2), Ensemble(2), Ensemble(3)


def test_chain_columns_names_generations_and_student_ensembles() -> None:
    metrics = {"accuracy": {"gen0": 0.9, "gen1": 0.91, "gen10": 0.8, "gen2": 0.92, "ens2": 0.93, "ens2+teacher": 0.94}}
    cols = chain_columns(metrics)
    assert cols == {TEACHER: 0.9, BAN1: 0.91, BAN2: 0.92, Generation(10): 0.8, ENS2: 0.93}
    assert list(cols) == [TEACHER, BAN1, BAN2, Generation(10), ENS2]  # by number, as sweep.json keeps them
    assert [c.label for c in cols] == ["Teacher", "BAN-1", "BAN-2", "BAN-10", "Ens*2"]


def test_one_run_in_paper_column_order() -> None:
    ban, dkpp = LossVariant("ban", "BAN"), LossVariant("dkpp", "DKPP")
    run: dict[Column, float] = {
        ENS2: 0.9312,
        Generation(10): 0.5,
        BAN2: 0.925,
        dkpp: 0.8,
        BAN1: 0.92,
        ban: 0.91,
        TEACHER: 0.9,
        Control(1): 0.4,
    }
    assert format_table([run], "wrn28_2").splitlines() == [
        "| Network (test accuracy %, 1 seed) | Teacher | BAN | DKPP | BAN-1 | BAN-2 | BAN-10 | Ens*2 | Control-1 |",
        "|---|---|---|---|---|---|---|---|---|",
        "| wrn28_2 | 90.00 | 91.00 | 80.00 | 92.00 | 92.50 | 50.00 | 93.12 | 40.00 |",
    ]


def test_several_runs_give_mean_and_sample_std_of_the_runs_that_have_the_column() -> None:
    runs: list[dict[Column, float]] = [{TEACHER: 0.90, BAN1: 0.95}, {TEACHER: 0.92}, {TEACHER: 0.94}]
    # Teacher: 90, 92, 94 -> mean 92, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2; BAN-1: one value, no std.
    assert format_table(runs, "cnn1d").splitlines() == [
        "| Network (test accuracy %, 3 seeds) | Teacher | BAN-1 |",
        "|---|---|---|",
        "| cnn1d | 92.00 ± 2.00 | 95.00 |",
    ]


def test_error_mode_reports_one_minus_accuracy() -> None:
    runs: list[dict[Column, float]] = [{TEACHER: 0.75, ENS3: 0.8}, {TEACHER: 0.65, ENS3: 0.8}]
    # errors: Teacher 25, 35 -> mean 30, std sqrt((25 + 25) / 1) = 7.07; Ens*3 20, 20 -> std 0.
    assert format_table(runs, "resnet20", error=True).splitlines() == [
        "| Network (test error %, 2 seeds) | Teacher | Ens*3 |",
        "|---|---|---|",
        "| resnet20 | 30.00 ± 7.07 | 20.00 ± 0.00 |",
    ]


def test_fitness_flags_give_each_advice_once(tmp_path) -> None:
    """Three near one-hot teachers in a chain: each student's finding (its own numbers) is listed, the
    shared advice only once; a different advice (another loss, another finding) is given in full too."""
    import json

    from pipeline.audit.fitness import Fitness, fitness_warnings
    from pipeline.core.paths import ProjectPaths
    from stages.report import fitness_flags

    layout = ProjectPaths(tmp_path)
    fits = {1: (Fitness(1.0, 0.008, 1.0, 9), "ban"), 2: (Fitness(1.0, 0.014, 1.0, 9), "ban")}
    fits[3] = (Fitness(0.9, 0.022, 1.0, 9), "ban")  # also under-fitted: a second, new advice
    fits[4] = (Fitness(1.0, 0.03, 1.0, 9), "dkpp")  # the same finding for another loss: its own advice
    for g, (f, loss) in fits.items():
        layout.train_metrics(g).parent.mkdir(parents=True, exist_ok=True)
        layout.train_metrics(g).write_text(json.dumps({"teacher": {"warnings": fitness_warnings(f, loss, g - 1)}}))
    lines = fitness_flags(layout, [0, 1, 2, 3, 4])
    text = "\n".join(lines)
    assert lines[:3] == ["", "## Teacher fitness flags", ""] and len(lines) == 3 + 5
    assert text.count("Raise the student's temperature") == 2  # once for 'ban', once for 'dkpp'
    assert text.count("Train the teacher longer") == 1
    for g, entropy in ((1, "0.0080"), (2, "0.0140"), (3, "0.0220"), (4, "0.0300")):
        assert f"teacher generation {g - 1}'s outputs at T = 1 have mean entropy {entropy} nats" in text
    assert (
        "- **generation 2**: teacher generation 1's outputs at T = 1 have mean entropy 0.0140 nats (< 0.05); the "
        "same advice as for generation 1" in lines
    )


def test_report_says_generation_0_learned_from_labels(tmp_path) -> None:
    """The report's per-generation table names what each generation learned from: generation 0's store has
    no teacher (attribute None), shown as "labels", not Python's None; students name their teacher."""

    import numpy as np

    from pipeline.cache.store import LogitStore
    from pipeline.core.paths import ProjectPaths
    from stages import report

    layout = ProjectPaths(tmp_path)
    for g, teacher, loss in ((0, None, "ce"), (1, 0, "ban")):
        attrs = {"generation": g, "arch": "tiny", "seed": g, "temperature": 1.0, "checkpoint_sha256": "00" * 32}
        attrs |= {"dataset_fingerprint": "ef" * 32, "class_names": ["a", "b"], "teacher": teacher, "loss": loss}
        store = LogitStore.create(layout.store(g), {"train": 4, "test": 2}, 2, 1, "float32", 4, attrs)
        store.write("train", 0, np.zeros((4, 2)))
        store.write("test", 0, np.zeros((2, 2)))
        store.seal()
    from pipeline.results.ensemble import write_ensemble_metrics

    write_ensemble_metrics(
        layout.ensemble_metrics, {"accuracy": {"gen0": 0.5, "gen1": 1.0}, "members": {"gen0": [0], "gen1": [1]}}
    )
    text = report.run(layout)
    assert "| generation | arch | loss | learned from | seed | test acc % |" in text
    assert "| 0 | tiny | ce | labels | 0 | 50.00 |" in text
    assert "| 1 | tiny | ban | generation 0 | 1 | 100.00 |" in text
    assert "None" not in text and layout.report.read_text() == text
