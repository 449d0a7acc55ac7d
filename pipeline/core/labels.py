"""The label of a row that has none: a transfer set's unlabelled train rows (`data.n_unlabelled`) carry it in
the prepared dataset, the stores' train_labels and every batch; label terms skip those rows."""

UNLABELLED = -1
