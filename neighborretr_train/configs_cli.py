"""List the shipped configs and copy one out to edit (like torchtune's `tune ls` / `tune cp`).

    neighborretr-configs ls                       # every config, by group
    neighborretr-configs ls experiment            # one group
    neighborretr-configs cp experiment/msrvtt_vitb32 my_configs/experiment/my_run.yaml
    neighborretr-configs cp all my_configs        # the whole tree

A copied config is used with Hydra's --config-dir, which adds a folder to the search path:
    neighborretr-train --config-dir my_configs experiment=my_run
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from neighborretr_train import config_dir


def list_configs(group: str | None = None) -> dict[str, list[str]]:
    """{group: [names]} of the shipped configs ("" is the top level: train, eval, validate)."""
    root = config_dir()
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root)
        name = rel.parent.as_posix() if rel.parent != Path(".") else ""
        found.setdefault(name, []).append(rel.stem)
    if group is not None:
        if group not in found:
            raise ValueError(f"no config group {group!r}; groups: {', '.join(g for g in found if g)}")
        return {group: found[group]}
    return found


def copy_config(name: str, dest: str | Path) -> Path:
    """Copies config `name` ("experiment/msrvtt_vitb32", "train", or "all" for the tree) to `dest`; refuses to
    overwrite. A destination folder (or a path without .yaml) receives the file under its own name."""
    root, dest = config_dir(), Path(dest)
    if name == "all":
        if dest.exists():
            raise FileExistsError(f"{dest} exists; choose a new folder")
        shutil.copytree(root, dest)
        return dest
    source = root / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not source.is_file():
        raise FileNotFoundError(f"no config {name!r}; `neighborretr-configs ls` lists them")
    if dest.is_dir() or dest.suffix != ".yaml":
        dest = dest / source.name
    if dest.exists():
        raise FileExistsError(f"{dest} exists; remove it or choose another name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list configs")
    ls.add_argument("group", nargs="?", help="one group (experiment, model, loss, ...)")
    cp = commands.add_parser("cp", help="copy a config out to edit")
    cp.add_argument("name", help="group/name (e.g. experiment/msrvtt_vitb32), a top-level name, or 'all'")
    cp.add_argument("dest", help="destination file or folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "ls":
            for group, names in list_configs(args.group).items():
                print(f"{group or '(top level)'}: {' '.join(names)}")
        else:
            print(f"copied to {copy_config(args.name, args.dest)}")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
