"""The CLI: the top floor, the only part of `gonka_hpc` that imports `ledger` and `verify`."""
