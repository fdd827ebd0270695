"""Every bad input gets a clear answer (DESIGN.md section 8, issue 14): no crash, no silent wrong
result, nothing lost.

One table: each case makes its input in a temporary folder, runs one command-line tool on it
and states the expected exit class and the words its message must hold. A case fails on a
traceback (any ``Traceback (most recent call last)`` in its output), on a signal (a negative
exit status: a crash), on another exit class, or on missing words. Tools run in-process
through :func:`common.cli.run_cli`, as their ``__main__`` does; a subprocess is used only
where the process itself matters (a crash in native code, signals, child processes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import SafetensorError

import train.checkpointing as checkpointing
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.registry import Suite
from common.interrupts import stop_on_signals, wait_child
from common.textfiles import decode_user_text
from shards.build import build
from shards.cli import main as shards_main
from common.cli import run_cli
from shards.format import parse_index
from shards.manifest import load_manifest
from shards.synthetic import generate
from shards.synthetic import main as synthetic_main
from tests.pass_tiny_data import tiny_shards
from tests.tiny_datasets import jpeg_bytes, market, msmt17, regdb, sysu
from train.checkpointing import list_checkpoints, load_model_state
from train.demo import main as demo_main
from train.evaluate import main as evaluate_main
from train.finetune import DOCUMENT
from train.finetune import main as finetune_main
from train.pretrain import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
#: exit classes: ok 0, user error 2, check failed 1 (verify), stopped by SIGINT / SIGTERM
OK, USER, CHECK, SIGINT_EXIT, SIGTERM_EXIT = 0, 2, 1, 130, 143


# -- data shared by the cases (built once per module) ----------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad-inputs")
    sets = {"sysu": sysu(base / "sysu").root, "market": market(base / "market").root,
            "regdb": regdb(base / "regdb").root}
    out = {name: root for name, root in sets.items()}
    build("sysu-mm01", sets["sysu"], base / "sysu-shards", workers=1, shard_size=8)
    build("market1501", sets["market"], base / "market-shards", workers=1)
    build("regdb", sets["regdb"], base / "regdb-shards", workers=1)
    out.update({f"{name}-shards": base / f"{name}-shards" for name in sets})
    out["pass-shards"] = tiny_shards(tmp_path_factory)
    return out


def copy_of(path: Path, tmp: Path) -> Path:
    target = tmp / path.name
    shutil.copytree(path, target)
    return target


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written into, even by an administrator account (a read-only
    mount then: permission bits do not stop root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot make a read-only folder as root here (no mount)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


# -- inputs -------------------------------------------------------------------------------------

def shard_member(folder: Path, shard: str, ext: str, sample: int = 0):
    return next(m for m in parse_index((folder / shard.replace(".tar", ".idx")).read_text())[sample] if m.ext == ext)


def change_bytes(path: Path, offset: int, new: bytes) -> None:
    """Overwrite bytes in place: same size."""
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def zero_first_jpeg(folder: Path, shard: str) -> None:
    """~200 zeroed bytes inside the first JPEG of a shard, the size kept (the issue's crash)."""
    jpg = shard_member(folder, shard, "jpg")
    change_bytes(folder / shard, jpg.offset + 150, bytes(min(200, jpg.size - 160)))


def sysu_copy(data, tmp: Path) -> Path:
    return copy_of(data["sysu"], tmp)


def write_ids(root: Path, name: str, data: bytes) -> None:
    (root / "exp" / name).write_bytes(data)


def csv_list(tmp: Path, text: str | bytes, name: str = "list.csv") -> Path:
    (tmp / "images").mkdir(exist_ok=True)
    for i in range(2):
        (tmp / f"images/{i}.jpg").write_bytes(jpeg_bytes(i))
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def build_args(layout: str, root: Path, tmp: Path, *extra: str) -> list[str]:
    return ["build", "--layout", layout, "--root", str(root), "--out", str(tmp / "out"), "--workers", "1",
            "--quiet", *extra]


def pass_run(shards: Path, tmp: Path, *extra: str) -> list[str]:
    return ["--preset", "pass_tiny", "--shards", str(shards), "--output_dir", str(tmp / "run"),
            "--progress_bar", "false", "--max_steps", "1", *extra]


@dataclass(frozen=True)
class Case:
    """``make(data, tmp) -> argv`` prepares the input; ``tool`` runs it; the exit status must be
    ``exit`` and the output must hold every one of ``words``."""

    name: str
    tool: Callable
    make: Callable[[dict, Path], list[str]]
    exit: int
    words: tuple[str, ...]


def _utf16(text: str) -> bytes:
    return text.encode("utf-16")  # with its BOM, as Windows Notepad's "Unicode"


def sysu_ids(name: str, data_: bytes):
    def make(data, tmp):
        root = sysu_copy(data, tmp)
        write_ids(root, name, data_)
        return build_args("sysu-mm01", root, tmp)
    return make


def regdb_idx_latin1(data, tmp):
    root = copy_of(data["regdb"], tmp)
    path = root / "idx" / "train_visible_1.txt"
    path.write_bytes(path.read_bytes().replace(b"male", b"m\xe4le", 1))
    return build_args("regdb", root, tmp)


def msmt_list(mutate: Callable[[bytes], bytes]):
    def make(data, tmp):
        root = tmp / "msmt"
        msmt17(root)
        path = root / "list_train.txt"
        path.write_bytes(mutate(path.read_bytes()))
        return build_args("msmt17", root, tmp)
    return make


def msmt_all_wrong(data, tmp):
    root = tmp / "msmt"
    msmt17(root)
    for name in ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"):
        path = root / name
        path.write_text("".join(f"wrong/{line}\n" for line in path.read_text().splitlines()))
    return build_args("msmt17", root, tmp)


def manifest_list(text: str | bytes, name: str = "list.csv", *extra: str):
    def make(data, tmp):
        return build_args("manifest", csv_list(tmp, text, name), tmp, *extra)
    return make


def sysu_dangling_symlink(data, tmp):
    root = sysu_copy(data, tmp)
    (root / "cam1/0001/0009.jpg").symlink_to(root / "cam1/0001/gone.jpg")
    return build_args("sysu-mm01", root, tmp, "--strict")


def sysu_damaged_header(data, tmp):
    root = sysu_copy(data, tmp)
    path = root / "cam1/0001/0001.jpg"
    raw = bytearray(path.read_bytes())
    raw[200:400] = bytes(200)  # inside the tables: Pillow still decodes it, DALI's parser refuses it
    path.write_bytes(bytes(raw))
    return build_args("sysu-mm01", root, tmp, "--strict")


def shards_with(change: Callable[[Path], None], key: str = "pass-shards"):
    def make(data, tmp):
        folder = copy_of(data[key], tmp)
        change(folder)
        return folder
    return make


def label_byte(folder: Path) -> None:
    lbl = shard_member(folder, "train-000000.tar", "lbl")
    change_bytes(folder / "train-000000.tar", lbl.offset, (15).to_bytes(4, "little"))


def jpeg_byte(folder: Path) -> None:
    jpg = shard_member(folder, "train-000001.tar", "jpg")
    path = folder / "train-000001.tar"
    change_bytes(path, jpg.offset + jpg.size // 2, bytes([path.read_bytes()[jpg.offset + jpg.size // 2] ^ 0xFF]))


def truncate(folder: Path) -> None:
    path = folder / "train-000002.tar"
    path.write_bytes(path.read_bytes()[:-2048])


def bad_label_map(folder: Path) -> None:
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    first = next(iter(doc["pid_to_label"]))
    doc["pid_to_label"][first] = 99
    path.write_text(json.dumps(doc))


def pretrain_on(make_shards, *extra: str):
    def make(data, tmp):
        return pass_run(make_shards(data, tmp), tmp, *extra)
    return make


def verify_on(make_shards):
    def make(data, tmp):
        return ["verify", str(make_shards(data, tmp))]
    return make


def a_file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("x")
    return path


def results_dir(mutate: Callable[[Path], None]):
    def make(data, tmp):
        folder = tmp / "results"
        (folder / "machine").mkdir(parents=True)
        mutate(folder / "machine" / "decode.json")
        return ["report", "--results", str(folder)]
    return make


CASES = [
    # users' text files: one reader (common.textfiles)
    Case("sysu exp list with a 0xff byte", shards_main, sysu_ids("train_id.txt", b"1,2\xff"), USER,
         ("train_id.txt:1", "not UTF-8", "save it as UTF-8")),
    Case("sysu exp list in UTF-16 with BOM", shards_main, sysu_ids("train_id.txt", _utf16("1,2")), OK, ()),
    Case("sysu exp list in UTF-8 with BOM", shards_main, sysu_ids("test_id.txt", b"\xef\xbb\xbf4,5"), OK, ()),
    Case("sysu exp list in UTF-16 without BOM", shards_main, sysu_ids("val_id.txt", "3".encode("utf-16-le")), USER,
         ("val_id.txt:1", "byte-order mark")),
    Case("sysu id in train and test lists", shards_main, sysu_ids("test_id.txt", b"2,4,5"), USER,
         ("identities 2", "train_id.txt and exp/test_id.txt")),
    Case("regdb idx list in Latin-1", shards_main, regdb_idx_latin1, USER, ("train_visible_1.txt:1", "not UTF-8")),
    Case("msmt17 list with a 0xff byte", shards_main, msmt_list(lambda b: b"\xff" + b), USER,
         ("list_train.txt:1", "not UTF-8")),
    Case("msmt17 list in UTF-16 with BOM", shards_main, msmt_list(lambda b: _utf16(b.decode())), OK, ()),
    Case("msmt17 lists whose paths are all wrong", shards_main, msmt_all_wrong, USER,
         ("no usable images", "rejected", "listed in list_")),
    # manifest lists: structure errors, value rejections
    Case("manifest csv with UTF-8 BOM", shards_main, manifest_list(b"\xef\xbb\xbfpath,pid\nimages/0.jpg,1\n"), OK, ()),
    Case("manifest csv in Latin-1", shards_main, manifest_list(b"path,pid\nimages/0.jpg,1\nimages/\xe9.jpg,2\n"), USER,
         ("list.csv:3", "not UTF-8")),
    Case("manifest csv in UTF-16", shards_main, manifest_list(_utf16("path,pid\nimages/0.jpg,1\n")), OK, ()),
    Case("manifest csv row with an extra field", shards_main, manifest_list("path,pid\nimages/0.jpg,1,7\n"), USER,
         ("list.csv:2", "more field")),
    Case("manifest jsonl line that is a list", shards_main,
         manifest_list('{"path": "images/0.jpg"}\n["images/1.jpg", 1]\n', "list.jsonl"), USER,
         ("list.jsonl:2", "JSON list", "not an object")),
    Case("manifest jsonl pid [1]", shards_main,
         manifest_list('{"path": "images/0.jpg", "pid": [1]}\n', "list.jsonl", "--strict"), USER,
         ("pid [1] is not an integer",)),
    Case("manifest jsonl pid 1.7", shards_main,
         manifest_list('{"path": "images/0.jpg", "pid": 1.7}\n{"path": "images/1.jpg", "pid": 2}\n', "list.jsonl",
                       "--strict"), USER, ("pid 1.7 is not an integer",)),
    Case("manifest jsonl pid true", shards_main,
         manifest_list('{"path": "images/0.jpg", "pid": true}\n{"path": "images/1.jpg", "pid": 2}\n', "list.jsonl",
                       "--strict"), USER, ("pid true is not an integer",)),
    # source images
    Case("dangling symlink among the images", shards_main, sysu_dangling_symlink, USER,
         ("0009.jpg", "broken symbolic link")),
    Case("source JPEG with a damaged header Pillow accepts", shards_main, sysu_damaged_header, USER,
         ("cam1/0001/0001.jpg", "corrupt JPEG", "invalid marker")),
    # changed shards: never read silently
    Case("one .lbl byte changed (pid 8 -> 15)", pretrain_main, pretrain_on(shards_with(label_byte)), USER,
         ("train-000000.tar is damaged", "sha256", "shards verify")),
    Case("one JPEG byte changed, --source wds", pretrain_main,
         pretrain_on(shards_with(jpeg_byte), "--source", "wds"), USER, ("train-000001.tar is damaged",)),
    Case("truncated shard, --source wds", pretrain_main, pretrain_on(shards_with(truncate), "--source", "wds"), USER,
         ("train-000002.tar is damaged", "bytes")),
    Case("changed byte with --skip_damaged", pretrain_main,
         pretrain_on(shards_with(jpeg_byte), "--skip_damaged", "true", "--source", "wds"), OK,
         ("warning: skipping 1 damaged shard", "train-000001.tar")),
    Case("verify names a changed byte", shards_main, verify_on(shards_with(label_byte)), CHECK,
         ("BAD train-000000.tar", "disagrees with its JSON")),
    Case("verify an edited pid_to_label", shards_main, verify_on(shards_with(bad_label_map, "sysu-shards")), CHECK,
         ("BAD manifest.json", "pid_to_label")),
    Case("train on an edited pid_to_label", pretrain_main,
         lambda d, t: ["--preset", "mmgl_tiny", "--shards", str(shards_with(bad_label_map, "sysu-shards")(d, t)),
                       "--output_dir", str(t / "run"), "--max_steps", "1"], USER, ("inconsistent", "pid_to_label")),
    Case("verify on a file", shards_main, lambda d, t: ["verify", str(d["sysu-shards"] / "manifest.json")], USER,
         ("is a file",)),
    Case("mmgl on RGB-only shards", pretrain_main,
         lambda d, t: ["--preset", "mmgl_tiny", "--shards", str(d["market-shards"]), "--output_dir", str(t / "r")],
         USER, ("--split all",)),
    Case("mmgl on regdb shards without --split all", pretrain_main,
         lambda d, t: ["--preset", "mmgl_tiny", "--shards", str(d["regdb-shards"]), "--output_dir", str(t / "r")],
         USER, ("pass --split all",)),
    # output paths: checked before the work starts
    Case("pretrain --output_dir a file", pretrain_main,
         lambda d, t: ["--preset", "pass_tiny", "--shards", str(d["pass-shards"]), "--output_dir", str(a_file(t))],
         USER, ("--output_dir", "is a file")),
    Case("demo --out a file", demo_main, lambda d, t: ["--scale", "tiny", "--out", str(a_file(t))], USER,
         ("--out", "is a file")),
    Case("inspect --sheet a folder", shards_main,
         lambda d, t: ["inspect", str(d["sysu-shards"]), "--sheet", str(t)], USER, ("--sheet", "is a folder")),
    Case("inspect --sheet .xyz", shards_main,
         lambda d, t: ["inspect", str(d["sysu-shards"]), "--sheet", str(t / "s.xyz")], USER, ("'.xyz'", ".png")),
    Case("inspect --sheet under a file", shards_main,
         lambda d, t: ["inspect", str(d["sysu-shards"]), "--sheet", str(a_file(t) / "s.png")], USER,
         ("--sheet", "is a file")),
    Case("benchmarks run --results a file", benchmarks_main,
         lambda d, t: ["run", "--suite", "decode", "--quick", "--results", str(a_file(t))], USER,
         ("--results", "is a file")),
    # benchmark reports
    Case("benchmarks report on a corrupt JSON", benchmarks_main, results_dir(lambda p: p.write_text('{"suite": ')),
         USER, ("decode.json is not valid JSON",)),
    Case("benchmarks report on a partial JSON", benchmarks_main,
         results_dir(lambda p: p.write_text('{"suite": "decode", "rows": []}')), USER, ("partial suite result",)),
    Case("benchmarks report on a missing folder", benchmarks_main,
         lambda d, t: ["report", "--results", str(t / "none")], USER, ("does not exist",)),
]

READ_ONLY_CASES = [
    Case("demo --out read-only", demo_main, lambda d, ro: ["--scale", "tiny", "--out", str(ro / "demo")], USER,
         ("--out", "cannot write")),
    Case("synthetic --out read-only", synthetic_main,
         lambda d, ro: ["--layout", "sysu-mm01", "--out", str(ro / "syn"), "--ids", "2"], USER, ("--out", "cannot write")),
    Case("inspect --sheet read-only", shards_main,
         lambda d, ro: ["inspect", str(d["sysu-shards"]), "--sheet", str(ro / "s.png")], USER, ("--sheet", "cannot write")),
    Case("benchmarks run --results read-only", benchmarks_main,
         lambda d, ro: ["run", "--suite", "decode", "--quick", "--results", str(ro / "r")], USER,
         ("--results", "Read-only file system")),
    Case("shards build --out read-only", shards_main,
         lambda d, ro: build_args("sysu-mm01", d["sysu"], ro), USER, ("could not write", "Read-only file system")),
    Case("pretrain --output_dir read-only", pretrain_main, lambda d, ro: ["--preset", "pass_tiny", "--shards",
         str(d["pass-shards"]), "--output_dir", str(ro / "run")], USER, ("--output_dir", "cannot write")),
]


def check(status: int, output: str, case: Case) -> None:
    assert TRACEBACK not in output, f"{case.name}: traceback\n{output}"
    assert status >= 0, f"{case.name}: killed by signal {-status}\n{output}"
    assert status == case.exit, f"{case.name}: exit {status}, expected {case.exit}\n{output}"
    missing = [w for w in case.words if w not in output]
    assert not missing, f"{case.name}: the message lacks {missing}\n{output}"
    if case.exit == USER:  # one clear line
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, f"{case.name}: expected one 'error:' line\n{output}"


def run_in_process(case: Case, argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # what the tool would print as "warning: ..."
        warnings.simplefilter("always")
        status = run_cli(case.tool, argv)
    out, err = capfd.readouterr()
    return status, out + err + "".join(f"warning: {w.message}\n" for w in caught)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, data, tmp_path, capfd):
    check(*run_in_process(case, case.make(data, tmp_path), capfd), case)


@pytest.mark.parametrize("case", READ_ONLY_CASES, ids=[c.name for c in READ_ONLY_CASES])
def test_read_only_output(case, data, read_only_dir, capfd):
    check(*run_in_process(case, case.make(data, read_only_dir), capfd), case)


def test_utf16_list_reads_as_its_utf8_twin():
    text = "1,2\n3\n"
    assert decode_user_text(text.encode("utf-16"), "x") == decode_user_text(b"\xef\xbb\xbf" + text.encode(), "x") == text


# -- a full disk while a checkpoint is written ----------------------------------------------------

def test_disk_full_while_checkpointing_keeps_the_last_good_one(data, tmp_path, capfd, monkeypatch):
    real_save = checkpointing.save_file
    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:  # the second checkpoint meets a full disk (safetensors' own wording)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpointing, "save_file", save_file)
    case = Case("disk full at the second checkpoint", pretrain_main, lambda d, t: [], USER,
                ("the disk is full", "last good checkpoint", "step_00000002", "is intact", "--resume"))
    argv = pass_run(data["pass-shards"], tmp_path, "--max_steps", "4", "--checkpoint_every_steps", "2")
    check(*run_in_process(case, argv, capfd), case)
    run = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert not list(run.glob(".tmp-*"))
    assert load_model_state(run / "step_00000002")  # intact: it loads
    monkeypatch.setattr(checkpointing, "save_file", real_save)
    assert run_cli(pretrain_main, [*argv, "--resume", "latest"]) == 0  # and the run continues from it


# -- a corrupt JPEG in a shard never kills the process (DALI) -------------------------------------

def run_process(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)
    return done.returncode, done.stdout + done.stderr


def test_zeroed_bytes_in_the_first_jpeg_never_reach_dali(data, tmp_path, source="cache"):
    """The issue's crash (exit 139 in 6 of 7 runs, the cache filled by DALI): now refused before
    any reader opens the shard (the DALI and webdataset sources: tests/test_sources.py)."""
    shards = copy_of(data["sysu-shards"], tmp_path)
    first = next(s.file for s in load_manifest(shards).shards_of("train"))
    zero_first_jpeg(shards, first)
    case = Case("zeroed JPEG bytes", None, lambda d, t: [], USER, (f"{first} is damaged", "sha256"))
    argv = ["-m", "train.pretrain", "--preset", "mmgl_tiny", "--shards", str(shards), "--output_dir",
            str(tmp_path / "run"), "--max_steps", "1", "--progress_bar", "false", "--source", source]
    check(*run_process(argv), case)


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------------

def test_interrupt_swallowed_by_the_tool_still_exits_130(capfd):
    def swallowing_main(argv):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a careless library does
        return 0

    assert run_cli(swallowing_main, []) == SIGINT_EXIT
    assert capfd.readouterr().err.strip() == "interrupted"


def test_interrupt_reported_as_unraisable_is_raised_again_in_the_main_thread(capfd):
    """The interrupt that lands in logging's at-fork lock handler ends in sys.unraisablehook
    ("Exception ignored ... Traceback"): it is raised again where the program can stop."""
    class Info:
        exc_type, exc_value, exc_traceback, err_msg, object = KeyboardInterrupt, KeyboardInterrupt(), None, None, None

    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        sys.unraisablehook(Info())
        for _ in range(1000):
            time.sleep(0.001)  # the re-raised interrupt lands here
    assert TRACEBACK not in capfd.readouterr().err


def test_sigterm_inside_a_tool_is_one_line_and_143(capfd):
    def main(argv):
        signal.raise_signal(signal.SIGTERM)
        return 0

    assert run_cli(main, []) == SIGTERM_EXIT
    assert capfd.readouterr().err.strip() == "terminated (SIGTERM)"


def test_ctrl_c_during_a_benchmark_suite_is_one_line(monkeypatch, tmp_path, capfd):
    def interrupted(self, ctx):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Suite, "run", interrupted)
    case = Case("benchmarks Ctrl-C", benchmarks_main, lambda d, t: [], SIGINT_EXIT, ("interrupted",))
    check(*run_in_process(case, ["run", "--suite", "decode", "--quick", "--results", str(tmp_path)], capfd), case)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start_and_signal(argv: list[str], ready: Callable[[subprocess.Popen], bool], sig: int, timeout: float = 300):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=REPO)
    start = time.monotonic()
    while not ready(process) and process.poll() is None:
        assert time.monotonic() - start < timeout, "the tool never got ready"
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(sig)
    out, err = process.communicate(timeout=timeout)
    return process, out + err


def test_sigterm_during_pretraining_with_dataloader_workers(data, tmp_path, sig=signal.SIGTERM,
                                                           status=SIGTERM_EXIT, words="terminated"):
    """A real signal in a real run (SIGINT takes the same path: the in-process tests above). The
    run is far longer than the test: the preset's 2 epochs (12 steps) once ended within the second
    between the run's start and the signal, which then found a process on its way out."""
    run = tmp_path / "run"
    argv = ["-m", "train.pretrain", *pass_run(data["pass-shards"], tmp_path)[:-2], "--max_steps", "100000",
            "--epochs", "10000", "--source", "wds", "--num_workers", "2"]
    process, output = start_and_signal(argv, lambda p: (run / "config.json").is_file(), sig)
    check(process.returncode, output, Case("signal", None, lambda d, t: [], status, (words,)))


def test_sigterm_to_the_demo_takes_its_stage_down(tmp_path):
    """Signalled while the pre-training and a random-init fine-tuning run side by side: both go."""
    out = tmp_path / "demo"
    seen: list[int] = []

    def stages_running(process) -> bool:
        kids = children_of(process.pid)
        seen[:] = kids
        lines = [Path(f"/proc/{k}/cmdline").read_bytes() for k in kids if Path(f"/proc/{k}").exists()]
        return all(any(name in line for line in lines) for name in (b"train.pretrain", b"train.finetune"))

    argv = ["-m", "train.demo", "--scale", "tiny", "--out", str(out), "--quiet", "--workers", "1",
            "--jobs", "2", "--threads", "1"]
    process, output = start_and_signal(argv, stages_running, signal.SIGTERM)
    check(process.returncode, output, Case("demo SIGTERM", None, lambda d, t: [], SIGTERM_EXIT, ("terminated",)))
    time.sleep(0.5)
    assert not [k for k in seen if Path(f"/proc/{k}").exists() and b"train." in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_wait_child_tends_the_caller_and_stops_the_child_when_that_fails():
    """The demo tends its fine-tuning runs while the pre-training child runs: the callback runs
    while the child lives; if it raises, the child gets SIGTERM and the error goes on."""
    calls: list[float] = []
    quick = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(1.0); sys.exit(3)"])
    assert wait_child(quick, while_waiting=lambda: calls.append(time.monotonic()), every=0.1) == 3
    assert len(calls) >= 3  # ~1 s of a child at 0.1 s per call (the interpreter's start-up adds more)

    def failing() -> None:
        raise RuntimeError("a fine-tuning run failed")

    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(RuntimeError, match="fine-tuning run failed"):
        wait_child(slow, grace=5.0, while_waiting=failing, every=0.1)
    assert slow.returncode == -signal.SIGTERM


# -- fine-tuning and evaluation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(data, tmp_path_factory) -> Path:
    """A fine-tuning run of one step (ViT tiny at 64x32) on the Market shards."""
    base = tmp_path_factory.mktemp("finetuned")
    generate("market1501", base / "data", ids=10, images_per_id=4, workers=1)
    build("market1501", base / "data", base / "shards", shard_size=16, workers=1)
    data["synthetic-market-shards"] = base / "shards"
    argv = ["--preset", "transreid-tiny", "--shards", str(base / "shards"), "--output_dir", str(base / "run"),
            "--init", "random", "--max_steps", "1", "--eval_every", "0", "--progress_bar", "false", "--ids_per_batch", "2"]
    assert run_cli(finetune_main, argv) == 0
    return base / "run"


def other_arch_checkpoint(run: Path, tmp: Path) -> Path:
    """A copy of the run whose config names another architecture than its weights'."""
    copy = copy_of(run, tmp)
    checkpoint = list_checkpoints(copy / "checkpoints")[-1]
    doc = json.loads((checkpoint / DOCUMENT).read_text())
    doc["config"]["arch"] = "resnet_tiny"
    (checkpoint / DOCUMENT).write_text(json.dumps(doc))
    return checkpoint


def evaluate_args(checkpoint: Path, data, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--shards", str(data["synthetic-market-shards"]), "--protocol", "market",
            "--device", "cpu", "--source", "wds", "--no-progress", *extra]


FINETUNE_CASES = [
    Case("triplet fine-tuning with --instances 1", finetune_main,
         lambda d, t, run: ["--preset", "transreid-tiny", "--shards", str(d["synthetic-market-shards"]),
                            "--output_dir", str(t / "r"), "--init", "random", "--instances", "1"], USER, ("--instances must be at least 2", "positive")),
    Case("evaluate a checkpoint of another architecture", evaluate_main,
         lambda d, t, run: evaluate_args(other_arch_checkpoint(run, t), d), USER,
         ("do not fit", "resnet_tiny", "another architecture")),
    Case("evaluate a fine-tuned run at another --size", evaluate_main,
         lambda d, t, run: evaluate_args(list_checkpoints(run / "checkpoints")[-1], d, "--size", "128", "64"), USER,
         ("--size 128 64", "fine-tuned at 64x32")),
]


@pytest.mark.parametrize("case", FINETUNE_CASES, ids=[c.name for c in FINETUNE_CASES])
def test_finetune_and_evaluate_input(case, data, finetuned, tmp_path, capfd):
    check(*run_in_process(case, case.make(data, tmp_path, finetuned), capfd), case)


def test_interrupt_in_a_tool_run_by_another_tool_stops_the_outer_one(capfd):
    def inner(argv):
        signal.raise_signal(signal.SIGINT)

    def outer(argv):
        run_cli(inner, [])
        print("went on after the interrupt")
        return 0

    assert run_cli(outer, []) == SIGINT_EXIT
    captured = capfd.readouterr()
    assert "went on" not in captured.out and captured.err.strip() == "interrupted"
