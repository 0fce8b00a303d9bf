"""Data-set presets: one switch that brings a data set with its sensible settings.

``conf/presets/<name>.yaml`` holds the values of params.yaml that go with data set
``<name>`` (image size, augmentation, architectures, epochs). Every preset sets the same
keys, so switching from one to another leaves nothing of the previous one behind.

    python -m kdpipe.presets cifar10           # write the preset into params.yaml (comments kept)
    python -m kdpipe.presets cifar10 --flags   # print it as `-S key=value` flags instead:
    dvc exp run $(python -m kdpipe.presets cifar10 --flags)
    python -m kdpipe.presets --list            # the presets and what they are
    python -m kdpipe.presets cifar10 --run -- dvc repro   # write it, run the command; if that fails,
                                               # params.yaml gets its previous bytes back

``make repro DATA=cifar10`` runs the ``--run -- dvc repro`` form. The result is validated
like any params.yaml before anything is written.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdpipe.config import parse_params
from kdpipe.errors import KdpipeError
from kdpipe.validation import flatten

PRESETS_DIR = Path("conf/presets")
PARAMS_FILE = Path("params.yaml")


def _yaml() -> Any:
    from ruamel.yaml import YAML  # ships with DVC

    yaml = YAML()  # round-trip mode: comments and layout survive
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def load_preset(name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, Any]:
    """The preset's values as {dotted.key: value} (plain Python types)."""
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(presets_dir)) or f"none (no {presets_dir}/ here; run from the project root)"
        raise KdpipeError(f"there is no preset {name!r}; choose one of: {names}.")
    import yaml as pyyaml

    data = pyyaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not data:
        raise KdpipeError(f"{path} must be a mapping of params.yaml keys to values.")
    return flatten(data)


def check_same_keys(presets_dir: Path = PRESETS_DIR) -> set[str]:
    """Every preset must set the same keys, or switching would leave stale values behind."""
    keys = {name: set(load_preset(name, presets_dir)) for name in available(presets_dir)}
    union = set().union(*keys.values()) if keys else set()
    for name, own in keys.items():
        if own != union:
            raise KdpipeError(
                f"{presets_dir}/{name}.yaml does not set {', '.join(sorted(union - own))}, which other presets set; "
                "add it so that switching data sets resets it."
            )
    return union


def _set(tree: Any, dotted: str, value: Any) -> None:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        if key not in node or not isinstance(node[key], dict):
            node[key] = CommentedMap()
        node = node[key]
    if isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()  # [32, 64, 128], like the rest of params.yaml
        value = seq
    node[leaf] = value


def _get(tree: Any, dotted: str) -> Any:
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def apply(name: str, params_path: Path = PARAMS_FILE, presets_dir: Path = PRESETS_DIR) -> dict[str, tuple[Any, Any]]:
    """Write preset ``name`` into ``params_path``; return {key: (old, new)} for what changed."""
    check_same_keys(presets_dir)
    values = load_preset(name, presets_dir)
    yaml = _yaml()
    tree = yaml.load(params_path.read_text())
    changes = {}
    for key, value in values.items():
        old = _get(tree, key)
        old_plain = list(old) if isinstance(old, list) else old
        if old_plain != value:
            changes[key] = (old_plain, value)
            _set(tree, key, value)
    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    import yaml as pyyaml

    parse_params(pyyaml.safe_load(buffer.getvalue()))  # never write a params.yaml a stage would refuse
    if changes:
        from kdpipe.io import atomic_path

        with atomic_path(params_path) as tmp:
            tmp.write_text(buffer.getvalue())
    return changes


def _flag_value(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))  # true/false/null/[32,64,128]: valid YAML
    return str(value)


def flags(name: str, presets_dir: Path = PRESETS_DIR) -> list[str]:
    """The preset as ``-S key=value`` arguments for ``dvc exp run`` (no spaces inside one)."""
    check_same_keys(presets_dir)
    out: list[str] = []
    for key, value in load_preset(name, presets_dir).items():
        out += ["-S", f"{key}={_flag_value(value)}"]
    return out


def describe(name: str, presets_dir: Path = PRESETS_DIR) -> str:
    """The first sentence of the preset file's header comment."""
    header = []
    for line in (presets_dir / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    return " ".join(header).split(". ")[0].rstrip(".") + "."


def run_with_preset(name: str, command: list[str], params_path: Path = PARAMS_FILE,
                    presets_dir: Path = PRESETS_DIR) -> int:
    """Apply preset ``name`` and run ``command``; when the command fails, put back the bytes
    params.yaml had before (unless it was changed meanwhile). Returns the command's exit status."""
    before = params_path.read_bytes()
    _print_changes(name, apply(name, params_path, presets_dir), params_path)
    written = params_path.read_bytes()
    sys.stdout.flush()  # the changes before the command's own output
    try:
        process = subprocess.Popen(command)
    except FileNotFoundError:
        status = 127  # the shell's "command not found"
        print(f"error: {command[0]}: command not found", file=sys.stderr)
    else:
        while True:
            try:
                status = process.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the command too: let it stop on its own
                continue
        if status < 0:  # killed by signal -status: report it as a shell would
            status = 128 - status
    if status != 0 and written != before:
        if params_path.read_bytes() == written:
            from kdpipe.io import atomic_path

            with atomic_path(params_path) as tmp:
                tmp.write_bytes(before)
            print(f"{params_path} was restored as it was before the {name} preset, because "
                  f"`{shlex.join(command)}` failed (exit status {status}).", file=sys.stderr)
        else:
            print(f"{params_path} changed while `{shlex.join(command)}` ran, so it was left as it is "
                  f"(the command failed, exit status {status}).", file=sys.stderr)
    return status


def _print_changes(name: str, changes: dict[str, tuple[Any, Any]], params_path: Path) -> None:
    if not changes:
        print(f"{params_path} already has the {name} preset")
    for key, (old, new) in changes.items():
        print(f"{params_path}: {key}: {json.dumps(old)} -> {json.dumps(new)}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    if "--" in argv:  # --run's command
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m kdpipe.presets", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [NAME] [--flags | --list | --run -- COMMAND ...]")
    parser.add_argument("name", nargs="?", help="the preset (data set) to switch to")
    parser.add_argument("--flags", action="store_true", help="print `-S key=value` flags for dvc exp run instead")
    parser.add_argument("--list", action="store_true", help="list the presets")
    parser.add_argument("--run", action="store_true",
                        help="then run the COMMAND after `--` (-- dvc repro); if it fails, params.yaml is restored")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params file to edit (params.yaml)")
    parser.add_argument("--presets-dir", type=Path, default=PRESETS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run != bool(command) or (args.run and (args.flags or not args.name)):
        parser.error("--run needs a preset NAME and a COMMAND after `--` (and goes without --flags)")
    if args.list or not args.name:
        for name in available(args.presets_dir):
            print(f"{name:14s} {describe(name, args.presets_dir)}")
        return
    if args.flags:
        print(" ".join(flags(args.name, args.presets_dir)))
        return
    if args.run:
        sys.exit(run_with_preset(args.name, command, args.params, args.presets_dir))
    _print_changes(args.name, apply(args.name, args.params, args.presets_dir), args.params)

if __name__ == "__main__":
    from kdpipe.stage import main as run_stage

    run_stage(main)
