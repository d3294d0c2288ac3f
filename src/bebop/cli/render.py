"""Everything the CLI shows or writes: the console, metric tables, each command's result table, JSON files, and
the one-line ``error: …`` that a :class:`BebopError` becomes. Commands compute; this module presents."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

try:
    from typer._click.exceptions import UsageError  # typer >= 0.22 vendors click
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import UsageError

from bebop.errors import BebopError
from bebop.experiments.names import RULE_NAMES

console = Console(width=None if sys.stdout.isatty() else 160)


def fmt(value, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``, or ``-`` when it was not measured (None)."""
    return "-" if value is None else format(value, spec)


def floats(values: Iterable[float], spec: str = ".2f") -> str:
    """A list of numbers on one line, space-separated (α per draft step)."""
    return " ".join(format(v, spec) for v in values)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], justify: str = "right") -> Table:
    """A rich table with right-aligned ``columns`` (numbers line up) and the given rows of cells."""
    out = Table(title=title)
    for c in columns:
        out.add_column(c, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        out.add_row(*row)
    return out


def print_dict(title: str, values: Mapping) -> None:
    """A two-column metric/value table; nested dicts are left out, lists are joined."""
    rows = []
    for k, v in values.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, dict):
            continue
        rows.append((k, str(v)))
    out = Table(title=title)
    out.add_column("metric")
    out.add_column("value", justify="right")
    for row in rows:
        out.add_row(*row)
    console.print(out)


def write_json(path: Path | None, data) -> None:
    """Write ``data`` as indented JSON to ``path`` (parents created); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))


def wrote(path: Path) -> None:
    console.print(f"wrote [bold]{path}[/]")


def usage_message(e: UsageError) -> str:
    """A click usage error on one line that names the bad value: typer checks a flag's type with pydantic, whose
    message leaves the value out, so it is taken from the validation error the usage error was raised from."""
    msg = e.format_message()
    errors = getattr(e.__cause__, "errors", None)
    if callable(errors) and getattr(e, "param", None) is not None:
        (first, *_) = errors() or [{}]
        if "input" in first and not isinstance(first["input"], (list, tuple, dict)):
            msg = f"{msg} (got {first['input']!r})"
    msg = " ".join(msg.split())
    return msg[:1].lower() + msg[1:]


def fail(message: str) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr (no markup read from the message) and exit with 2."""
    Console(stderr=True).print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def run_app(app) -> None:
    """Run the typer ``app``; a :class:`BebopError` or a usage error (unknown flag, a value of the wrong type, a
    missing option) becomes one ``error: …`` line on stderr and exit code 2, so bad input never shows a traceback
    or a usage panel."""
    try:
        code = app(standalone_mode=False)  # click errors reach us instead of click's own report
    except BebopError as e:
        fail(str(e))
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare group: its help is already printed
            sys.exit(e.exit_code)
        fail(usage_message(e))
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:  # typer.Exit(code), Ctrl-C (130)
        sys.exit(code)


# ---------------------------------------------------------------------------------------------- bench tables


def decode_table(results: Mapping, title: str) -> Table:
    """The table of ``bench decode`` (fixed γ) from its JSON results; at ctx: the fraction of the limit with the costs
    timed at the mean decode context; rows/slot: live rows per batch slot, plain/MTP."""
    cols = ["batch", "plain tok/s", "mtp tok/s", "speedup", "decode speedup", "limit", "fraction", "at ctx", "cv/c1",
            "cd/c1", "ccu/c1", "rows/slot", "hf tok/s", "hf mtp tok/s", "accept len", "alpha"]
    rows = [(bs, f"{r['plain_tokens_per_s']:.0f}", f"{r['mtp_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x",
             fmt(r.get("decode_speedup"), ".2f"), f"{r['speedup_limit']:.2f}x", fmt(r.get("fraction_of_limit"), ".2f"),
             fmt(r.get("fraction_of_limit_at_decode_context"), ".2f"),
             fmt(r.get("c_verify_over_c_1"), ".2f"), fmt(r.get("c_draft_over_c_1"), ".2f"),
             fmt(r.get("c_catchup_over_c_1"), ".2f"),
             f"{fmt(r.get('plain_row_utilization'), '.2f')}/{fmt(r.get('mtp_row_utilization'), '.2f')}",
             fmt(r.get("hf_tokens_per_s"), ".0f"),
             fmt(r.get("hf_mtp_tokens_per_s"), ".0f"), f"{r['accept_length']:.2f}", floats(r["alpha"]))
            for bs, r in results.items()]
    return table(title, cols, rows)


def _adaptive_rows(bs: str, r: Mapping) -> list[tuple[str, ...]]:
    """Rows of one batch size of ``bench decode --gamma auto``: plain, every fixed γ, auto, and the replay."""
    best = r["fixed"][r["best_fixed"]]["tokens_per_s"]
    rows: list[tuple[str, ...]] = [(bs, "plain", f"{r['plain_tokens_per_s']:.0f}", "1.00x", "", "", "", "")]
    for name, row in [*r["fixed"].items(), ("auto", r["auto"])]:
        mark = " *" if name == r["best_fixed"] else ""
        rows.append((bs, name + mark, f"{row['tokens_per_s']:.0f}", f"{row['speedup']:.2f}x",
                     f"{row['accept_length']:.2f}", f"{row['mean_gamma']:.2f}", f"{row['target_only_fraction']:.0%}",
                     f"{row['tokens_per_s'] / best:.2f}"))
    upto = r.get("auto_vs_best_fixed_upto", [])
    if len(upto) > 5:        # the usual fixed range, when adaptive may draft longer than γ = 5
        rows.append((bs, "auto vs best fixed γ ≤ 5", "", "", "", "", "", f"{upto[4]:.2f}"))
    rp = r.get("replay")
    if rp is not None:       # decisions replayed on recorded decode steps under the calibrated costs (no clock)
        rows.append((bs, f"replay: auto (best fixed γ = {rp['best_fixed_gamma']})", "", "", "",
                     f"{rp['planner_mean_gamma']:.2f}", "", f"{rp['planner_vs_best_fixed']:.2f}"))
        rows.append((bs, "replay: oracle", "", "", "", "", "", f"{rp['oracle_vs_best_fixed']:.2f}"))
    return rows


def adaptive_table(results: Mapping, title: str) -> Table:
    """The table of ``bench decode --gamma auto`` from its JSON results: one row per (batch, run)."""
    cols = ["batch", "run", "tok/s", "vs plain", "accept len", "mean γ", "TO rows", "vs best fixed"]
    return table(title, cols, [row for bs, r in results.items() for row in _adaptive_rows(bs, r)])


def losses_table(results: Mapping, title: str) -> Table:
    """The table of ``bench losses``: α and accept length per loss under RS and TO, at τ = 1 and τ = 0.7."""
    cols = ("loss", "α RS (τ=1)", "accept len RS", "α TO (τ=1)", "accept len TO", "accept len RS τ=0.7",
            "accept len TO τ=0.7")
    rows = [(name, floats(r["alpha_rs"], ".3f"), f"{r['accept_length_rs']:.3f}", floats(r["alpha_to"], ".3f"),
             f"{r['accept_length_to']:.3f}", f"{r['accept_length_rs_t0.7']:.3f}", f"{r['accept_length_to_t0.7']:.3f}")
            for name, r in results.items()]
    return table(title, cols, rows)


def rl_bench_table(results: Mapping, title: str) -> Table:
    """The table of ``bench rl``: per method, mean times, speedups, accuracy and accept-length drift."""
    cols = ("method", "step s", "rollout s", "train s", "step ×", "rollout ×", "acc before", "acc after",
            "accept len step0", "first5", "last5", "max dev", "entropy first5→last5")
    rows = []
    for name, r in results.items():
        def f(k: str, spec: str = ".3f", r: Mapping = r) -> str:
            return fmt(r.get(k), spec)

        rows.append((name, f("mean_step_s"), f("mean_rollout_s"), f("mean_train_s"), f("step_speedup", ".2f"),
                     f("rollout_speedup", ".2f"), f("accuracy_before"), f("accuracy_after"),
                     f("accept_length_step0"), f("accept_length_first5"), f("accept_length_last5"),
                     f("max_rel_dev_from_step0", ".1%"), f"{r['entropy_first5']:.3f}→{r['entropy_last5']:.3f}"))
    return table(title, cols, rows)


# ---------------------------------------------------------------------------------------------- analyze tables



def sweep_table(res: Mapping, title: str) -> Table:
    """The table of ``analyze sweep``: per head and τ, entropy, RS / TO accept length and α."""
    cols = ("head", "τ", "entropy", "accept len RS", "accept len TO", "α RS", "α TO")
    rows = []
    for name, row in res["heads"].items():
        rs, to = (row[r] for r in RULE_NAMES)
        for i, t in enumerate(res["temperatures"]):
            rows.append((name, f"{t:g}", f"{rs['entropy'][i]:.3f}", f"{rs['accept_length'][i]:.3f}",
                         f"{to['accept_length'][i]:.3f}", floats(rs["alpha"][i]), floats(to["alpha"][i])))
    return table(title, cols, rows)


def sweep_fits(res: Mapping) -> dict[str, str]:
    """``{"<head> RS slope /nat (r)": "+s (+r)"}`` for every fitted (head, rule) of ``analyze sweep``."""
    fits = {}
    for name, row in res["heads"].items():
        for rule, tag in RULE_NAMES.items():
            fit = row[rule]["fit"]
            if fit["slope"] is not None and fit["r"] is not None:
                fits[f"{name} {tag} slope /nat (r)"] = f"{fit['slope']:+.3f} ({fit['r']:+.2f})"
    return fits


def entropy_table(res: Mapping, title: str) -> Table:
    """The table of ``analyze entropy``: per head and rule, the per-token fits and the decision-boundary check."""
    cols = ("head", "rule", "positions", "mean accept len", "slope /nat", "intercept", "r", "α_k slopes",
            "boundary agreement", "RS wins")
    rows = []
    for name, row in res["heads"].items():
        for rule, tag in RULE_NAMES.items():
            r, fit = row[rule], row[rule]["fit"]
            slopes = " ".join(fmt(a["slope"], "+.2f") for a in r["alpha_fits"])
            boundary = row["decision_boundary"]
            rows.append((name, tag, str(row["n_positions"]), fmt(r["mean_accept_length"]), fmt(fit["slope"]),
                         fmt(fit["intercept"]), fmt(fit["r"]), slopes, fmt(boundary["agreement"], ".4f"),
                         fmt(boundary["rs_wins"])))
    return table(title, cols, rows)


def announce_paths() -> None:
    """From now on, print once which forward path decodes (lean or transformers', with dtype and device): the
    engine says so when decoding starts (``bebop.engine.forwards.report_paths``). Every model command calls this
    first, so nothing runs on a slower path unannounced."""
    from bebop.engine.forwards import report_paths

    report_paths(lambda line: console.print(line, highlight=False))
