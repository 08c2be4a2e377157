"""Parameter counts of the presets, computed from the built modules, against the papers.

    python -m models.params --markdown          # the table in docs/training.md / README
    python -m models.params --check README.md   # fails if the table there is out of date

Counts are trainable parameters (``sum(p.numel())``; BatchNorm running statistics are buffers
and not counted), which is how the papers' numbers come out.  A paper number "matches" when
our exact count rounds to it at the precision the paper prints.
"""
from __future__ import annotations

import argparse
import sys

from .registry import build, count_params, head_config, resolve

# (preset, classes, source, the paper's number as printed (or None), unit, note)
ROWS = [
    ("cnn", 10, "SpinalNet Table II", "21.84", "k", "1HL 50"),
    ("spinal-cnn-8", 10, "SpinalNet Table II", "13.82", "k", "6HL x 8, 2 segments"),
    ("spinal-cnn-10", 10, "SpinalNet Table II", "16.05", "k", "6HL x 10, 2 segments"),
    ("vgg5", 10, "SpinalNet Table II", "3.646", "M", "1HL 512 (dropout, BN)"),
    ("spinal-vgg5", 10, "SpinalNet Table II", "3.630", "M", "4HL x 128, BN, dropout 0.5"),
    ("progressive-vgg5", 10, "ProgressiveSpinalNet", None, "M", "4HL x 128, dropout 0.2"),
    ("resnet18-fc", 26, "Spinal-ResNet18 §3.2", None, "M", "one Linear"),
    ("resnet18-fc512", 26, "Spinal-ResNet18 Table 1", "11.44", "M", "1HL 512"),
    ("spinal-resnet18", 26, "Spinal-ResNet18 Table 1", "11.78", "M",
     "4HL x 128 on 2 segments of 256 (SpinalNet code)"),
    ("spinal-resnet18-s4h64", 26, "Spinal-ResNet18 §3.4", "11.78", "M",
     "its §3.4 wording: 4 segments of 128, 64-wide layers"),
    ("progressive-resnet18", 26, "-", None, "M", "4HL x 128, dropout 0.2"),
    ("rescnn", 10, "-", None, "k", "residual CNN, linear classifier"),
    ("spinal-rescnn", 10, "-", None, "k", "4HL x 64"),
]

_SCALE = {"k": 1e3, "M": 1e6}


def _decimals(x: str) -> int:
    return len(x.split(".")[1]) if "." in x else 0


def table_rows(backend: str = "torch") -> list[dict]:
    """One dict per preset with our exact count and the comparison with the paper."""
    out = []
    for name, classes, source, paper, unit, note in ROWS:
        n = count_params(build(name, classes, backend=backend))
        backbone, _ = head_config(name)
        row = dict(model=name, backbone=backbone, head=resolve(name).head, classes=classes,
                   params=n,
                   source=source, paper=paper, unit=unit, note=note, match=None)
        if paper is not None:
            ours = f"{n / _SCALE[unit]:.{_decimals(paper)}f}"
            row["match"] = ours == paper
            row["ours_rounded"] = ours
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | backbone | head | classes | parameters (exact) | paper | matches | notes |",
             "|---|---|---|---:|---:|---|---|---|"]
    for r in rows:
        if r["paper"] is None:
            paper, match = "-", "-"
        else:
            paper = f"{r['paper']}{r['unit']} ({r['source']})"
            match = "yes" if r["match"] else (
                f"**no**: we get {r['ours_rounded']}{r['unit']}")
        lines.append(f"| `{r['model']}` | {r['backbone']} | {r['head']} | {r['classes']} | "
                     f"{r['params']:,} | {paper} | {match} | {r['note']} |")
    return "\n".join(lines)


BEGIN, END = "<!-- params-table:begin -->", "<!-- params-table:end -->"


def check_file(path: str, table: str) -> str | None:
    """None if ``path`` holds ``table`` between the BEGIN/END markers, else what is wrong."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        return f"cannot read {path}: {e}"
    if BEGIN not in text or END not in text:
        return f"{path} has no {BEGIN} ... {END} block"
    found = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    if found != table.strip():
        return (f"the parameter table in {path} is out of date; regenerate it with "
                "`python -m models.params --markdown`")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.params", description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--check", metavar="FILE", nargs="+",
                   help="check that FILE's table (between the params-table markers) is current")
    args = p.parse_args(argv)
    rows = table_rows()
    if args.check:
        problems = [m for f in args.check if (m := check_file(f, markdown(rows)))]
        for m in problems:
            print(m, file=sys.stderr)
        return 1 if problems else 0
    if args.markdown:
        print(markdown(rows))
    else:
        for r in rows:
            flag = "" if r["match"] is None else ("  paper OK" if r["match"] else "  != paper")
            print(f"{r['model']:24s} {r['classes']:3d} classes {r['params']:>12,d}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
