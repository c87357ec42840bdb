"""`dicom-node transcode`: offline transcoding of files and folders with the fallback ladder."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from tqdm import tqdm

from node.config.model import CHECKS, CoerceConfig, DeidentifyConfig
from node.config.schema import ConfigError, Table, read_table
from node.shape import Shaping, ShapingFailed
from node.shape.build import build_shaping
from node.transcode import Outcome, Target, TranscodePool, parse_target


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transcode",
        help="transcode DICOM files offline, with verification and fallback",
        description=(
            "Transcode DICOM files. Every lossless encode is verified by decoding; an image "
            "a syntax cannot hold falls back to the next syntax, and finally is copied as "
            "received."
        ),
    )
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="files or folders")
    parser.add_argument(
        "--to",
        metavar="SYNTAX[,FALLBACK...]",
        help="transfer syntaxes to try in order (pydicom keywords or UIDs); without it,"
        " --coerce and --deidentify keep each file's syntax and its Pixel Data bytes",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR")
    parser.add_argument("--workers", type=int, default=None, help="codec worker processes")
    parser.add_argument(
        "--allow-lossy", action="store_true", help="permit lossy syntaxes in the ladder"
    )
    parser.add_argument(
        "--coerce",
        type=Path,
        metavar="FILE",
        help="a TOML file with `set` and `delete`, as in [destination.coerce]",
    )
    parser.add_argument(
        "--deidentify",
        action="store_true",
        help="apply the PS3.15 Annex E Basic Profile, as [destination.deidentify] does",
    )
    parser.add_argument(
        "--uid-secret-file", type=Path, metavar="FILE", help="the key UIDs are remapped under"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME",
        help="an Annex E option, e.g. retain-longitudinal-dates (repeatable)",
    )


@dataclass
class Summary:
    converted: int = 0
    fell_back: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # the shaping refused (not written)
    source_bytes: int = 0
    written_bytes: int = 0

    def add(self, outcome: Outcome) -> None:
        self.source_bytes += outcome.source_size
        self.written_bytes += outcome.size
        if outcome.fallback:
            self.fell_back[_reason_group(outcome.reasons)] += 1
        else:
            self.converted += 1

    def lines(self) -> list[str]:
        lines = [f"converted: {self.converted}"]
        lines.append(f"fell back: {sum(self.fell_back.values())}")
        lines += [f"  {count:6d}  {reason}" for reason, count in self.fell_back.most_common()]
        lines.append(f"failed (unreadable): {len(self.failed)}")
        lines += [f"  {line}" for line in self.failed]
        if self.refused:
            lines.append(f"refused (not written): {len(self.refused)}")
            lines += [f"  {line}" for line in self.refused]
        ratio = self.source_bytes / self.written_bytes if self.written_bytes else 0.0
        lines.append(f"total compression ratio: {ratio:.2f}")
        return lines


def _reason_group(reasons: tuple[str, ...]) -> str:
    # The first rung's reason names why the wanted syntax was not used.
    return reasons[0] if reasons else "unknown"


def run(args: argparse.Namespace) -> int:
    try:
        ladder = parse_ladder(args.to or "")
        shaping = read_shaping(args)
    except (ValueError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not ladder and shaping is None:
        print("error: give --to, --coerce or --deidentify", file=sys.stderr)
        return 2
    if any(target.lossy for target in ladder) and not args.allow_lossy:
        print("error: the ladder has a lossy syntax; add --allow-lossy", file=sys.stderr)
        return 2
    if shaping is not None:
        print(f"applying: {shaping.describe()}", file=sys.stderr)
    jobs = list(find_jobs(args.inputs, args.output))
    summary = transcode_all(jobs, ladder, args.workers, args.allow_lossy, shaping)
    print("\n".join(summary.lines()))
    return 1 if summary.failed or summary.refused else 0


def read_shaping(args: argparse.Namespace) -> Shaping | None:
    """The same tables and checks as a target's [coerce] and [deidentify] in the config."""
    coerce = CoerceConfig()
    if args.coerce is not None:
        file = args.coerce.resolve()
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(file, "", str(error)) from None
        coerce = read_table(Table(file, "", data), CoerceConfig, CHECKS)
    deidentify = DeidentifyConfig()
    if args.deidentify:
        where = Path("--deidentify")
        given: dict[str, object] = {"profile": "basic", "options": list(args.option)}
        if args.uid_secret_file is not None:
            given["uid_secret_file"] = str(args.uid_secret_file.resolve())
        deidentify = read_table(Table(where, "", given), DeidentifyConfig, CHECKS)
    elif args.option or args.uid_secret_file:
        raise ValueError("--option and --uid-secret-file go with --deidentify")
    return build_shaping(coerce, deidentify)


def parse_ladder(text: str) -> list[Target]:
    return [parse_target(part) for part in text.split(",") if part.strip()]


def find_jobs(inputs: Sequence[Path], outdir: Path) -> Iterator[tuple[Path, Path]]:
    """(source, destination) pairs; folders keep their relative layout under outdir."""
    for item in inputs:
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file()):
                yield path, outdir / item.name / path.relative_to(item)
        else:
            yield item, outdir / item.name


def transcode_all(
    jobs: list[tuple[Path, Path]],
    ladder: list[Target],
    workers: int | None,
    allow_lossy: bool,
    shaping: Shaping | None = None,
) -> Summary:
    summary = Summary()
    with TranscodePool(workers) as pool, ThreadPoolExecutor(pool.size) as threads:

        def one(job: tuple[Path, Path]) -> tuple[Path, Outcome | str | None]:
            src, dst = job
            if not _looks_like_dicom(src):
                return src, None
            try:
                return src, pool.transcode(
                    src, dst, ladder, allow_lossy=allow_lossy, shaping=shaping
                )
            except ShapingFailed as refusal:
                return src, str(refusal)  # nothing written: never the file as it was

        results = threads.map(one, jobs)
        for src, outcome in tqdm(results, total=len(jobs), unit="file", file=sys.stderr):
            if isinstance(outcome, str):
                summary.refused.append(f"{src}: {outcome}")
            elif outcome is None or not outcome.transfer_syntax:
                summary.failed.append(str(src))
            else:
                summary.add(outcome)
    return summary


def _looks_like_dicom(path: Path) -> bool:
    try:
        dcmread(path, stop_before_pixels=True)
        return True
    except Exception:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.transcode_cli")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
