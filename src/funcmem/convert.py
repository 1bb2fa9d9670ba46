"""``funcmem convert``: a generator checkpoint from one format to the other, losslessly
(``funcmem.hywu.convert_to_funcmem`` / ``convert_to_hywu``; the destination appears whole or not at all)."""

from __future__ import annotations

from .hywu import convert_to_funcmem, convert_to_hywu


def add_arguments(parser) -> None:
    """``funcmem convert hywu-to-funcmem SRC DST`` and ``funcmem convert funcmem-to-hywu SRC DST``."""
    how = parser.add_subparsers(dest="direction", required=True)
    for name, text in (("hywu-to-funcmem", "HY-WU checkpoint -> funcmem generator directory"),
                       ("funcmem-to-hywu", "funcmem generator directory -> HY-WU checkpoint")):
        p = how.add_parser(name, help=text)
        p.add_argument("src", help="source directory")
        p.add_argument("dst", help="destination directory (new or empty)")


def run_cli(args) -> int:
    convert = {"hywu-to-funcmem": convert_to_funcmem, "funcmem-to-hywu": convert_to_hywu}[args.direction]
    convert(args.src, args.dst)
    print(f"wrote {args.dst}")
    return 0
