"""The `unas` command line (also `python -m orchestrator`)."""

import argparse
import json
import logging
import os
import signal
import sys

from search_spaces.errors import UnasError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def command_validate(args: argparse.Namespace) -> int:
    from orchestrator.spec import SpecError, load_spec

    status = EXIT_OK
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as error:
            print(error.message, file=sys.stderr)
            status = EXIT_INVALID
            continue
        print(f"{path}: valid (job {spec.name}, id {spec.job_id()})")
    return status


def command_run(args: argparse.Namespace) -> int:
    from orchestrator.driver import resolve_output_dir, run_job
    from orchestrator.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as error:
        print(error.message, file=sys.stderr)
        return EXIT_INVALID
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # `ray job stop` and schedulers send SIGTERM: exit through Python so open runs get closed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    output_dir = resolve_output_dir(spec, args.output)
    result = run_job(spec, output_dir, args.tracking_uri)
    print(f"\nJob {spec.name} (id {result.job_id}), parent MLflow run {result.parent_run_id}\n")
    print(result.table_markdown)
    print(f"Tables: {output_dir / 'tables'}")
    if result.failed:
        for key, error in result.failed.items():
            print(f"FAILED {key}: {error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def command_report(args: argparse.Namespace) -> int:
    from orchestrator.report import build_report

    markdown = build_report(output=args.output, tracking_uri=args.tracking_uri, job=args.job)
    print(markdown)
    return EXIT_OK


def command_genotype_show(args: argparse.Namespace) -> int:
    from orchestrator.genotypes import show_genotype, show_proxyless_genotype

    if args.space == "proxyless":
        summary = show_proxyless_genotype(args.genotype, latency=args.latency)
        keys = ("params_m", "madds_m", "layers") + (("latency_ms",) if args.latency else ())
    else:
        summary = show_genotype(args.genotype, args.dataset, draw_path=args.draw)
        keys = ("params_m", "madds_m", "madds_paper_m", "channels", "layers")
    print(json.dumps({key: summary[key] for key in keys}) if args.json else summary["text"])
    return EXIT_OK


def command_genotype_sample(args: argparse.Namespace) -> int:
    from search_spaces.darts import SEARCH_OPS, random_genotype

    genotype = random_genotype(args.seed, SEARCH_OPS)
    if args.output:
        genotype.save(args.output)
        print(f"wrote {args.output}")
    print(genotype.to_json())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unas", description="UNAS architecture search jobs on Ray with MLflow records")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) a job spec")
    run.add_argument("spec", help="YAML job spec")
    run.add_argument("--output", help="output folder (default: runs/<job name>)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<output>/mlflow.db)")
    run.set_defaults(handler=command_run)

    validate = commands.add_parser("validate", help="check job specs and print every problem")
    validate.add_argument("specs", nargs="+", help="YAML job spec(s)")
    validate.set_defaults(handler=command_validate)

    report = commands.add_parser("report", help="rebuild a job's results table from its MLflow runs")
    report.add_argument("--output", help="the job's output folder (uses its mlflow.db)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI")
    report.add_argument("--job", help="job name (the experiment); required with --tracking-uri")
    report.set_defaults(handler=command_report)

    genotype = commands.add_parser("genotype", help="inspect genotypes")
    genotype_commands = genotype.add_subparsers(dest="genotype_command", required=True)
    show = genotype_commands.add_parser("show", help="layers, channels, params and multiply-adds of a genotype")
    show.add_argument("genotype", help="a known name (e.g. UNAS_CIFAR10) or a genotype JSON file")
    show.add_argument("--space", default="darts", choices=["darts", "proxyless"])
    show.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "imagenet"],
                      help="DARTS space only; proxyless networks are sized for ImageNet")
    show.add_argument("--latency", action="store_true", help="proxyless space: also time the network on this device")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument("--draw", metavar="PNG", help="also draw the normal and reduce cells")
    show.set_defaults(handler=command_genotype_show)
    sample = genotype_commands.add_parser("sample", help="a uniformly random cell pair")
    sample.add_argument("--seed", type=int, required=True)
    sample.add_argument("--output", help="write the genotype JSON here")
    sample.set_defaults(handler=command_genotype_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except UnasError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return error.exit_status
