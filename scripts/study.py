"""The loss study (python scripts/study.py --help). A launcher of neighborretr_train.study (also
`neighborretr-study`)."""

from neighborretr_train.study import cli

if __name__ == "__main__":
    cli()
