"""Generate the synthetic benchmark: python scripts/make_synthetic.py (= neighborretr-make-synthetic)."""

from neighborretr_train.make_synthetic import cli, main  # noqa: F401  (main: for runpy callers)

if __name__ == "__main__":
    cli()
