"""The report table: ensemble metrics mapped to Table 2's columns, and the markdown table's order, means,
sample standard deviations and error mode, against hand-written expected text."""

from __future__ import annotations

from pipeline.results.tables import chain_columns, format_table


def test_chain_columns_names_generations_and_student_ensembles() -> None:
    metrics = {"accuracy": {"gen0": 0.9, "gen1": 0.91, "gen2": 0.92, "ens2": 0.93, "ens2+teacher": 0.94}}
    assert chain_columns(metrics) == {"Teacher": 0.9, "BAN-1": 0.91, "BAN-2": 0.92, "Ens*2": 0.93}


def test_one_run_in_paper_column_order() -> None:
    run = {"Ens*2": 0.9312, "BAN-2": 0.925, "DKPP": 0.8, "BAN-1": 0.92, "BAN": 0.91, "Teacher": 0.9, "extra": 0.5}
    assert format_table([run], "wrn28_2").splitlines() == [
        "| Network (test accuracy %, 1 seed) | Teacher | BAN | DKPP | BAN-1 | BAN-2 | Ens*2 | extra |",
        "|---|---|---|---|---|---|---|---|",
        "| wrn28_2 | 90.00 | 91.00 | 80.00 | 92.00 | 92.50 | 93.12 | 50.00 |",
    ]


def test_several_runs_give_mean_and_sample_std_of_the_runs_that_have_the_column() -> None:
    runs = [{"Teacher": 0.90, "BAN-1": 0.95}, {"Teacher": 0.92}, {"Teacher": 0.94}]
    # Teacher: 90, 92, 94 -> mean 92, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2; BAN-1: one value, no std.
    assert format_table(runs, "cnn1d").splitlines() == [
        "| Network (test accuracy %, 3 seeds) | Teacher | BAN-1 |",
        "|---|---|---|",
        "| cnn1d | 92.00 ± 2.00 | 95.00 |",
    ]


def test_error_mode_reports_one_minus_accuracy() -> None:
    runs = [{"Teacher": 0.75, "Ens*3": 0.8}, {"Teacher": 0.65, "Ens*3": 0.8}]
    # errors: Teacher 25, 35 -> mean 30, std sqrt((25 + 25) / 1) = 7.07; Ens*3 20, 20 -> std 0.
    assert format_table(runs, "resnet20", error=True).splitlines() == [
        "| Network (test error %, 2 seeds) | Teacher | Ens*3 |",
        "|---|---|---|",
        "| resnet20 | 30.00 ± 7.07 | 20.00 ± 0.00 |",
    ]
