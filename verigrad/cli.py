"""``verigrad`` command line: parses arguments and calls the library, nothing more."""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

import click

from verigrad.batch import DEFAULTS as BATCH
from verigrad.batch import Backend, UnknownAs
from verigrad.bounds import Method
from verigrad.spec import CLI_FLAGS


def _one_line(e: BaseException | str) -> str:
    """The message of ``e`` on one line (torch and onnx messages span several)."""
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def _crash_report(e: BaseException) -> Path:
    """Write the full traceback of an internal error to a file of its own and return its path."""
    import tempfile
    import time
    import traceback

    path = Path(tempfile.gettempdir()) / f"verigrad-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(e)))
    return path


class _Guarded(click.Group):
    """Every command's failures become exit codes here and nowhere else: bad input (a
    :class:`~verigrad.errors.UserError`, or an OS error on a named file) exits 2 with one line;
    anything else is an internal error, exit 4, one line plus where the traceback was written
    (``--debug`` prints it instead). Exit codes 1 and 3 come only from verdicts."""

    def invoke(self, ctx: click.Context) -> object:
        from verigrad.errors import UserError
        from verigrad.reports import ExitCode

        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # one line, as for every other bad input
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except UserError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(int(ExitCode.BAD_INPUT))
        except OSError as e:
            if e.filename is None:
                raise _InternalFailure(e, bool(ctx.params.get("debug"))) from e
            click.echo(f"error: {e.filename}: {e.strerror or _one_line(e)}", err=True)
            ctx.exit(int(ExitCode.BAD_INPUT))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # noqa: BLE001 - the one place internal errors are reported
            raise _InternalFailure(e, bool(ctx.params.get("debug"))) from e
        return None  # pragma: no cover - ctx.exit raises


class _InternalFailure(click.ClickException):
    """An internal error, reported as one line (exit 4)."""

    exit_code = 4

    def __init__(self, e: BaseException, debug: bool) -> None:
        super().__init__("")
        self.error, self.debug = e, debug

    def show(self, file: object = None) -> None:
        e = self.error
        if self.debug:
            import traceback

            click.echo("".join(traceback.format_exception(e)), err=True, nl=False)
            where = "traceback above"
        else:
            try:
                where = f"traceback: {_crash_report(e)}"
            except OSError:
                where = "run with --debug for the traceback"
        click.echo(f"INTERNAL ERROR (a verigrad bug, please report it): {type(e).__name__}: {_one_line(e)} "
                   f"({where})", err=True)


def _load(spec_path: str, flags: dict):
    from verigrad.spec import apply_overrides, flag_overrides, load_spec

    return apply_overrides(load_spec(spec_path), flag_overrides(flags))


def _overrides(f):
    """The spec-key flags (declared once, by ``verigrad.spec.CLI_FLAGS``) and the output paths."""
    for fl in reversed(CLI_FLAGS):
        typ = click.Choice([m.value for m in fl.type]) if isinstance(fl.type, type) and issubclass(fl.type, Enum) \
            else fl.type
        f = click.option(fl.flag, fl.dest, multiple=fl.multiple, type=typ, help=fl.help)(f)
    f = click.option("--out", type=click.Path(dir_okay=False), help="results JSON (default: RESULTS/<spec>.json)")(f)
    f = click.option("--bounds-npz", type=click.Path(dir_okay=False),
                     help="bound maps .npz (default: RESULTS/<spec>.npz)")(f)
    return f


def _run(spec_path, flags: dict, out, bounds_npz, dump_config, table, attack_only=False):
    import dataclasses

    from verigrad import reports
    from verigrad.spec import dump_spec
    from verigrad.verify import prepare, verify

    spec = _load(spec_path, flags)
    if dump_config:
        click.echo(dump_spec(spec), nl=False)
        sys.exit(0)
    stem = Path(spec_path).stem + (".attack" if attack_only else "")
    json_path = Path(out) if out else spec.general.results / f"{stem}.json"
    npz_path = Path(bounds_npz) if bounds_npz else json_path.with_suffix(".npz")
    for path in (json_path, npz_path):  # before any work: a run must not end unable to write
        reports.check_writable(path)
    problem = prepare(spec, methods=() if attack_only else None)
    if attack_only:
        problem = dataclasses.replace(problem, empirical=True)
    writer = reports.ResultWriter(problem, json_path, npz_path)
    for note in problem.net.notes:  # what the loader did that changes what is explained
        click.echo(f"model: {note}", err=True)
    for note in problem.input_notes:  # where the inputs came from (a VNN-LIB box, its ignored output constraints)
        click.echo(f"input: {note}", err=True)

    def progress(r):
        writer(r)
        status = "ERROR" if r.error else " ".join(f"{k}={v.value}" for k, v in r.verdicts.items())
        click.echo(f"[{r.index}] {status}", err=True)

    results = verify(problem, on_instance=progress)
    doc = writer.finish()
    click.echo(table(problem, results))
    for r in results:
        if r.error:
            kind = "INTERNAL ERROR" if r.internal_error else "error"
            click.echo(f"{kind} on input {r.index}: {r.error}", err=True)
    if writer.witnesses:
        click.echo(f"witnesses: {writer.witness_dir} (check one with: verigrad replay FILE)", err=True)
    click.echo(f"results: {json_path}  bounds: {npz_path}", err=True)
    sys.exit(doc["summary"]["exit_code"])


@click.group(cls=_Guarded)
@click.version_option(package_name="verigrad")
@click.option("--debug", is_flag=True, help="print the traceback of an internal error (exit 4)")
def main(debug: bool) -> None:
    """Certify how far a network's saliency map can move over an input / parameter box.

    Exit codes, for every command: 0 done (all certified), 1 some property falsified, 2 bad
    input (one line names the file and the key or node), 3 some property unknown, 4 an
    internal error or a failed instance.
    """


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@_overrides
@click.option("--dump-config", is_flag=True, help="print the resolved spec (with overrides) and exit")
def verify(spec, out, bounds_npz, dump_config, **flags):
    """Bound the explanation of every input of SPEC, attack what is left, decide its properties.

    Exit code: 0 all certified, 1 some falsified, 2 bad input, 3 some unknown,
    4 an instance failed (including certified-and-falsified, a soundness failure).
    """
    from verigrad.reports import verify_table

    _run(spec, flags, out, bounds_npz, dump_config, verify_table)


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@_overrides
def compare(spec, out, bounds_npz, **flags):
    """Run ibp, crown and alpha-crown on SPEC and compare widths, verdicts, times and the
    certificate–attack gap (attacks run on every property unless --attack-order says otherwise)."""
    from verigrad.reports import compare_table

    # bab decides properties (a search per property): run it with verify --method bab
    flags["methods"] = flags["methods"] or tuple(m.value for m in Method if m != Method.BAB)
    flags["attack_order"] = flags["attack_order"] or "both"
    _run(spec, flags, out, bounds_npz, False, compare_table)


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@_overrides
def attack(spec, out, bounds_npz, **flags):
    """Attack every property of SPEC (no bounds) and measure empirical robustness: similarity of
    attacked and randomly perturbed explanations (PCC, SSIM, MSE, cosine, top-k, Kendall τ)
    and max-sensitivity. Writes RESULTS/<spec>.attack.json. Exit 1 if some property was
    falsified, 3 otherwise."""
    from verigrad.reports import attack_table

    flags["methods"], flags["attack_order"] = (), "both"
    _run(spec, flags, out, bounds_npz, False, attack_table, attack_only=True)


@main.command()
@click.argument("witness", type=click.Path(exists=True, dir_okay=False))
@click.option("--onnxruntime", "use_ort", is_flag=True,
              help="also check it in onnxruntime: the ONNX model's float32 forward against verigrad's, the "
                   "explanation by float64 finite differences, the property value from it (needs onnxruntime)")
def replay(witness, use_ort):
    """Re-check a WITNESS .npz in float64 from its model, data and embedded spec.

    Exit code, as for verify: 1 the witness violates its property at a point in the box
    (confirmed: the property is falsified), 3 it does not (nothing is shown), 2 the file or
    what it names cannot be read (with --onnxruntime also: onnxruntime missing, a model that
    is not ONNX, parameters that cannot be written into it).
    """
    from verigrad.reports import ExitCode
    from verigrad.verify import replay as replay_witness

    checked = None
    if use_ort:
        from verigrad.attacks.ort_replay import replay_onnxruntime

        checked = replay_onnxruntime(witness)
        r = checked.base
    else:
        r = replay_witness(witness)
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    click.echo(f"witness {r.path}: property {r.property!r} on input {r.index}")
    click.echo(f"  same input as the data set: {ok(r.same_input)}; same explained class: {ok(r.same_target)}")
    click.echo(f"  inside the box: {ok(r.in_box)}")
    click.echo(f"  value (float64, autograd): {r.value:.10g} (stored {r.stored_value:.10g}); "
               f"property: {r.direction}")
    click.echo(f"  violated: {ok(r.violated)}")
    confirmed = r.confirmed
    if checked is not None:
        for note in checked.notes:
            click.echo(f"note: {note}", err=True)
        for c in checked.checks:
            click.echo(f"  onnxruntime {c.name}: {ok(c.ok)}: {c.detail}")
        confirmed = checked.confirmed
    click.echo("CONFIRMED: a counterexample" if confirmed else "NOT CONFIRMED")
    sys.exit(int(ExitCode.FALSIFIED if confirmed else ExitCode.UNKNOWN))


@main.command()
def doctor():
    """Check this environment: versions (python, verigrad, torch, numpy, onnx, auto_LiRPA,
    the optional onnxruntime / captum / quantus), the auto_LiRPA compatibility shim's
    self-checks, CUDA and TF32, threads and free memory; one line per check.

    Exit code: 0 everything required passes, 2 a required component fails.
    """
    from verigrad.doctor import exit_code, run_checks

    checks = run_checks()
    for c in checks:
        click.echo(c.line())
    sys.exit(exit_code(checks))


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
def train(config):
    """Train the network CONFIG describes (with its regulariser, e.g. gradcert), export it to
    ONNX and write a ready verification spec and a per-epoch log beside it.

    Exit code: 0 done, 2 invalid config or data.
    """
    from verigrad.training.trainer import load_train_config, train as run_training

    cfg = load_train_config(config)

    def progress(row: dict) -> None:
        if cfg.general.progress:
            click.echo(f"epoch {row['epoch']}: loss {row['loss']:.4f} (ce {row['ce']:.4f}, penalty "
                       f"{row['penalty']:.4g}) train acc {row['train_accuracy']:.3f} certified box "
                       f"{row['certified_box_l2']:.4g} [{row['time_s']:.1f} s]", err=True)

    res = run_training(cfg, on_epoch=progress)
    click.echo(f"model: {res.onnx_path}\nverification spec: {res.spec_path} (run: verigrad verify {res.spec_path})"
               f"\nlog: {res.log_path}")


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"expected 'auto' or an integer >= 1, got {value!r}")
    return n


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--jobs", type=click.IntRange(min=1), default=BATCH.jobs, show_default=True, help="workers")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="seconds per instance (input)")
@click.option("--out", type=click.Path(file_okay=False), default=BATCH.out, show_default=True)
@click.option("--resume", is_flag=True,
              help="continue OUT: skip instances whose last line in OUT/results.jsonl (same spec hash) is a complete "
                   "result (certified/falsified/unknown verdicts); re-run those that ended in error or timeout")
@click.option("--overwrite", is_flag=True,
              help="discard the results already in OUT (without --resume or --overwrite, an OUT holding results "
                   "is refused)")
@click.option("--unknown-as", type=click.Choice([u.value for u in UnknownAs]), default=BATCH.unknown_as.value,
              show_default=True,
              help="how unknown verdicts appear in the JUnit XML")
@click.option("--backend", type=click.Choice([k.value for k in Backend]), default=BATCH.backend.value,
              show_default=True,
              help="local worker processes, or a Dask cluster (loopback LocalCluster unless --scheduler)")
@click.option("--scheduler", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (--backend dask)")
@click.option("--batch-size", default="auto", show_default=True, callback=lambda c, p, v: _batch_size(v),
              help="inputs of one spec per work unit (IBP bounds them in one call); auto sizes units from measured times")
@click.option("--threads", type=click.IntRange(min=1), default=BATCH.threads, show_default=True,
              help="torch threads per worker")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: when stderr is a terminal)")
@click.option("--max-inputs", type=click.IntRange(min=1), help="only the first N inputs of each spec (a smoke run)")
def batch(specs, jobs, timeout, out, resume, overwrite, unknown_as, backend, scheduler, batch_size, threads, progress,
          max_inputs):
    """Verify every input of every SPEC on a pool of workers, with a timeout per input
    (counted from when a worker starts it); stream results to OUT/results.jsonl, then write
    OUT/summary.json and OUT/junit.xml. One batch at a time per OUT (OUT/.lock). SIGTERM
    stops the workers and leaves OUT resumable (exit 143).
    Exit code as for verify, over all instances (a timeout counts as unknown).
    """
    import json as _json
    import time

    from tqdm import tqdm

    from verigrad import batch as b

    if scheduler is not None and backend != "dask":
        raise click.UsageError("--scheduler needs --backend dask")
    outp = Path(out)
    # OUT is locked (and shown writable) before any work, and stays locked until its summaries are written
    with b.output_lock(outp, on_note=lambda note: click.echo(f"note: {note}", err=True)):
        tasks = b.expand(specs, max_inputs)
        counts = {"certified": 0, "falsified": 0, "unknown": 0, "error": 0}
        began = time.monotonic()
        # without a terminal (CI logs) the bar would print control characters: one line per instance instead.
        # The ETA is the library's (per-spec mean times), not tqdm's single rate.
        bar = tqdm(total=len(tasks), unit="inst", file=sys.stderr, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                   disable=not (sys.stderr.isatty() if progress is None else progress))

        def on_result(rec: dict, p) -> None:
            if p.done == 1:
                bar.reset(total=p.total)  # resumed runs have fewer to do than the specs hold
            for _, _, v in b.verdict_rows([rec]):
                counts[v] += 1
            eta = f"ETA {p.eta_s:.0f} s"
            if bar.disable:
                click.echo(f"[{p.done}/{p.total}] {Path(rec['spec']).stem} input {rec['data_index']}: {rec['status']}"
                           f"{' (' + rec['reason'] + ')' if rec['reason'] else ''}  elapsed "
                           f"{time.monotonic() - began:.0f} s, {eta}", err=True)
            else:
                bar.set_postfix_str(f"{eta}; " + " ".join(f"{k[:4]} {n}" for k, n in counts.items()), refresh=False)
                bar.update(1)

        try:
            b.run_batch(tasks, outp, jobs=jobs, timeout=timeout, resume=resume, on_result=on_result,
                        backend=backend, batch_size=batch_size, scheduler=scheduler, threads=threads,
                        overwrite=overwrite)
        except b.Terminated:
            bar.close()
            click.echo(f"terminated: the workers were stopped; {outp / 'results.jsonl'} keeps every finished result "
                       "(continue with --resume)", err=True)
            sys.exit(128 + 15)
        finally:
            bar.close()
        records = b.load_records(outp)
        s = b.summary(records)
        (outp / "summary.json").write_text(_json.dumps(s, indent=1))
        (outp / "junit.xml").write_text(b.junit_xml(records, unknown_as))
    click.echo(f"{s['instances']} instances: {s['verdicts']}; timeouts {s['timeouts']}")
    click.echo(f"results: {outp / 'results.jsonl'}  summary: {outp / 'summary.json'}  junit: {outp / 'junit.xml'}",
               err=True)
    sys.exit(s["exit_code"])


@main.command()
@click.argument("results", type=click.Path())
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="page to write (default: <results stem>.html beside a JSON, OUT/report.html for a batch)")
@click.option("--max-instances", type=click.IntRange(min=0), default=20, show_default=True,
              help="inputs shown with pictures per spec (the summary counts all)")
@click.option("--bounds-npz", type=click.Path(dir_okay=False),
              help="bound maps .npz of a results JSON (default: the .npz beside it)")
def report(results, html_path, max_instances, bounds_npz):
    """Write a self-contained HTML report of RESULTS: a `verify` results JSON or a `batch`
    output directory. Shows verdict counts, engine widths and times, the IBP-vs-CROWN width
    comparison, and per input the bound maps as heatmaps and the witnesses.

    Exit code: 0 written, 2 RESULTS missing or not verigrad results.
    """
    from verigrad.report_html import write_report

    pages = write_report(results, html_path, max_instances=max_instances, bounds_npz=bounds_npz)
    click.echo(f"report: {pages[0]}")
    for p in pages[1:]:
        click.echo(f"  spec page: {p}", err=True)


if __name__ == "__main__":
    main()
