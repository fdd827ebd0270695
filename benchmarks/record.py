"""A suite's results: the JSON that holds every figure, and the Markdown table and PNG chart
made from it (by the run, and again by ``python -m benchmarks report``, from the JSON alone).

JSON layout (``<results>/<machine>/<suite>.json``)::

    suite, title, command, created (UTC, ISO 8601)
    machine:  benchmarks.machine.machine_info() + name (+ gpu when one was used)
    settings: what the suite ran with (sizes, batch, workers, warm-up, repeats, device, quick,
              load average before and after the run)
    primary:  the metric key charted and used by the ratios (e.g. ``images_per_s``)
    columns:  [[metric key, label], ...] shown in the table, in order
    rows:     [{key, name, <metric>: value, ..., seconds_all: [...], items}, ...]
    ratios:   [{name, numerator, denominator, metric, value, target}, ...]; value = numerator
              row's metric / denominator row's metric, both from the same run; target or null
    notes:    [str, ...] what a reader needs to interpret the figures
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.machine import machine_info, machine_name
from common.textfiles import read_user_text
from common.errors import UserError
from benchmarks.timing import Measurement

DEFAULT_RESULTS = Path(__file__).parent / "results"


@dataclass
class SuiteResult:
    """What a suite's ``run`` returns; :func:`save` adds the machine and writes the files."""

    suite: str
    title: str
    primary: str
    columns: list[tuple[str, str]]
    settings: dict
    rows: list[dict] = field(default_factory=list)
    ratios: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_row(self, key: str, name: str, measurement: Measurement, *, per: str = "image", **extra) -> None:
        """A row from a measurement: ``<per>s_per_s``, ``cpu_ms_per_<per>``, median seconds."""
        self.rows.append({
            "key": key,
            "name": name,
            f"{per}s_per_s": _figure(measurement.items_per_s),
            f"cpu_ms_per_{per}": round(measurement.cpu_ms_per_item, 4),
            # throughput per core-second of CPU: what a figure would be on an idle machine,
            # whatever share of the cores other jobs took during the run
            f"{per}s_per_cpu_s": _figure(1e3 / measurement.cpu_ms_per_item),
            "seconds_median": round(measurement.seconds_median, 4),
            "seconds_all": [round(s, 4) for s in measurement.seconds],
            # system time and minor page faults: fresh large buffers per batch show here
            f"system_ms_per_{per}": round(measurement.system_ms_per_item, 4),
            f"minor_faults_per_{per}": round(measurement.minor_faults_per_item, 3),
            "system_s_all": [round(s, 3) for s in measurement.system],
            "minor_faults_all": list(measurement.minor_faults),
            "items": measurement.items[0],
            **extra,
        })

    def row(self, key: str) -> dict:
        return next(r for r in self.rows if r["key"] == key)

    def add_ratio(self, name: str, numerator: str, denominator: str, target: float | None = None,
                  metric: str | None = None) -> None:
        """``numerator`` row's ``metric`` (default: the primary figure) over ``denominator``'s."""
        metric = metric or self.primary
        value = self.row(numerator)[metric] / self.row(denominator)[metric]
        self.ratios.append({"name": name, "numerator": numerator, "denominator": denominator, "metric": metric,
                            "value": round(value, 3), "target": target})


def _figure(value: float) -> float:
    """A rate for the JSON: one decimal, and at least 4 significant digits for small rates (a
    ViT-S step on a CPU makes fractions of an image per second; ratios are taken of these)."""
    return round(value, 1) if abs(value) >= 1000 else float(f"{value:.4g}")


def results_machine(device: str) -> str:
    """The results folder of this machine: ``cpu-<cores>c``, or the GPU's name on CUDA runs."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return machine_name()


def _machine(device: str) -> dict:
    info = {"name": results_machine(device), **machine_info()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda}
    return info


def save(result: SuiteResult, results_dir: Path, *, command: str, device: str) -> Path:
    """Write ``<suite>.json``, ``.md`` and ``.png`` under ``results_dir/<machine>/``."""
    doc = {
        "suite": result.suite,
        "title": result.title,
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "settings": result.settings,
        "primary": result.primary,
        "columns": [list(c) for c in result.columns],
        "rows": result.rows,
        "ratios": result.ratios,
        "notes": result.notes,
    }
    folder = Path(results_dir) / doc["machine"]["name"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.suite}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    write_table_and_chart(doc, folder)
    return path


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown(doc: dict, level: int = 3) -> str:
    """The suite's Markdown section (a heading of ``level``): figures, ratios, settings, notes."""
    m, s = doc["machine"], doc["settings"]
    gpu = f", {m['gpu']['name']}" if "gpu" in m else ""
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        f"{'#' * level} {doc['suite']}: {doc['title']}",
        "",
        f"{m['cpu']} ({m['cores']} cores{gpu}); {versions}. "
        f"`{doc['command']}`, {doc['created']}; load average before/after: "
        f"{s.get('load_average_before')} / {s.get('load_average_after')}.",
        "",
        "| configuration | " + " | ".join(label for _, label in doc["columns"]) + " |",
        "|---|" + "---:|" * len(doc["columns"]),
    ]
    for row in doc["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(_number(row.get(k, "")) for k, _ in doc["columns"]) + " |")
    if doc["ratios"]:
        lines += ["", "| ratio (same run) | of | value | target |", "|---|---|---:|---:|"]
        labels = dict(doc["columns"])
        for r in doc["ratios"]:
            target = f">= {r['target']}" if r["target"] is not None else ""
            of = labels.get(r.get("metric", doc["primary"]), r.get("metric"))
            lines.append(f"| {r['name']} | {of} | {r['value']:.2f} | {target} |")
    shown = {k: v for k, v in s.items() if not k.startswith("load_average")}
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + "."]
    lines += [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> None:
    """A horizontal bar chart of the primary figure of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in doc["rows"]][::-1]
    values = [r[doc["primary"]] for r in doc["rows"]][::-1]
    label = dict(doc["columns"]).get(doc["primary"], doc["primary"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.4))
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[_number(v) for v in values], padding=3, fontsize=8)
    ax.set_xlabel(label)
    ax.set_title(f"{doc['suite']}: {doc['title']}\n{doc['machine']['name']}, median of "
                 f"{doc['settings'].get('repeats')} after {doc['settings'].get('warmup')} warm-up", fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table_and_chart(doc: dict, folder: Path) -> None:
    (folder / f"{doc['suite']}.md").write_text(markdown(doc))
    chart(doc, folder / f"{doc['suite']}.png")


def load_results(results_dir: Path, order: list[str]) -> list[tuple[str, dict]]:
    """``(machine, doc)`` of every suite JSON under ``results_dir``, suites in ``order`` first."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        what = "is a file" if results_dir.exists() else "does not exist"
        raise UserError(f"results folder {results_dir} {what}; run `python -m benchmarks run --results "
                        f"{results_dir}` first")
    found = []
    for path in sorted(results_dir.glob("*/*.json")):
        try:
            doc = json.loads(read_user_text(path))
        except ValueError as err:
            raise UserError(f"{path} is not valid JSON ({err}); delete it or re-run its suite") from None
        if not isinstance(doc, dict) or "suite" not in doc:
            continue  # other JSON there (shard_build) has its own format
        missing = [key for key in RESULT_KEYS if key not in doc]
        if missing:
            raise UserError(f"{path} is a partial suite result (no {', '.join(missing)}); delete it or re-run "
                            f"`python -m benchmarks run --suite {doc['suite']}`")
        found.append((path.parent.name, doc))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=lambda md: (md[0], rank.get(md[1]["suite"], len(rank)), md[1]["suite"]))


#: Keys every suite result JSON has (module docstring).
RESULT_KEYS = ("suite", "title", "machine", "settings", "primary", "columns", "rows", "ratios")
#: The project README's results section lies between these two lines; ``report`` rewrites it.
README_MARKERS = ("<!-- benchmarks:begin -->", "<!-- benchmarks:end -->")
PROJECT_README = Path(__file__).parent.parent / "README.md"


def readme_summary(found: list[tuple[str, dict]]) -> str:
    """The README's compact view of the results: every ratio of every suite, with its target."""
    lines = ["| machine | suite | ratio (same run) | of | value | target |", "|---|---|---|---|---:|---:|"]
    for name, doc in found:
        labels = dict(doc["columns"])
        for r in doc["ratios"]:
            target = f">= {r['target']}" if r["target"] is not None else ""
            of = labels.get(r.get("metric", doc["primary"]), r.get("metric"))
            lines.append(f"| {name} | {doc['suite']} | {r['name']} | {of} | {r['value']:.2f} | {target} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, summary: str) -> bool:
    """Replace the text between :data:`README_MARKERS` in ``readme``; False when it has none."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    begin, end = README_MARKERS
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{summary}{end}{tail}")
    return True


def report(results_dir: Path, order: list[str], readme: Path | None = None) -> str:
    """Rebuild every suite's table and chart from its JSON and the results README; return it.
    With ``readme``, also rewrite that file's results section (:data:`README_MARKERS`)."""
    parts = ["## Benchmark results", "",
             "Generated by `python -m benchmarks report` from the JSON files next to this page. "
             "Every figure is the median of timed repeats after warm-up; every ratio compares two "
             "figures of the same run.", ""]
    machine = None
    for name, doc in load_results(results_dir, order):
        if name != machine:
            parts += [f"### {name}", ""]
            machine = name
        write_table_and_chart(doc, Path(results_dir) / name)
        parts += [markdown(doc, level=4), f"![{doc['suite']}]({name}/{doc['suite']}.png)", ""]
    text = "\n".join(parts)
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    (Path(results_dir) / "README.md").write_text(text)
    if readme is not None:
        update_readme(readme, readme_summary(load_results(results_dir, order)))
    return text


__all__ = ["DEFAULT_RESULTS", "PROJECT_README", "SuiteResult", "load_results", "markdown", "report", "results_machine", "save", "update_readme"]
