"""The ``onnx-nf4`` command line: quantize / inspect / dequantize round trips and every error case.

The commands run as ``python -m onnx_nf4`` subprocesses (exit status, stdout and stderr as a user sees them);
the few tests that need to patch the process call :func:`onnx_nf4.cli.entry` in-process.
"""

from __future__ import annotations

import io
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_nf4
from onnx_nf4.cli import entry as cli
from onnx_nf4.cli.common import Progress
from onnx_nf4.codec.blockwise import dequantize_blockwise, quantize_blockwise
from onnx_nf4.codec.layout import dequantize_weight, quantize_weight

REPO_ROOT = Path(__file__).resolve().parents[1]
K, N, N2 = 128, 96, 64  # first MatMul [K, N] (+ bias), Gemm weight [N2, N] with transB=1
SMALL = (64, 8)  # a weight below the default min_elements (4096): stays float


def run_cli(*args: object, **kwargs) -> subprocess.CompletedProcess[str]:
    """``python -m onnx_nf4 ARGS`` from the repo root; returns the completed process (never raises)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "onnx_nf4", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
        check=False,
        **kwargs,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str, status: int = 1) -> None:
    """The process failed with ``status`` and exactly one ``onnx-nf4: error:`` line holding every fragment."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnx-nf4: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, proc.stderr)
    assert "Traceback" not in proc.stderr


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W": (rng.standard_normal((K, N)) * 0.05).astype(np.float32),
        "bias": rng.standard_normal(N).astype(np.float32),
        "W2": (rng.standard_normal((N2, N)) * 0.05).astype(np.float32),
        "c2": rng.standard_normal(N2).astype(np.float32),
        "Ws": (rng.standard_normal(SMALL) * 0.1).astype(np.float32),
    }


def make_float_model(path: Path, seed: int = 0) -> Path:
    """A float model: ``MatMul(X, W) + bias -> Gemm(transB=1) -> MatMul(small W) -> MatMul(., Z)``.

    Rewritable: the MatMul ``mm`` (with its bias Add) and the Gemm ``gemm``. Skipped: ``small`` (512 elements,
    below the default ``min_elements``) and ``dynamic`` (B is the graph input ``Z``).
    """
    w = _weights(seed)
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "bias"], ["h"], name="mm_bias"),
        helper.make_node("Gemm", ["h", "W2", "c2"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "Ws"], ["s"], name="small"),
        helper.make_node("MatMul", ["s", "Z"], ["Y"], name="dynamic"),
    ]
    graph = helper.make_graph(
        nodes,
        "cli_test",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", K]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, [SMALL[1], 4]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(array, name) for name, array in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _inputs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X": rng.standard_normal((5, K)).astype(np.float32),
        "Z": rng.standard_normal((SMALL[1], 4)).astype(np.float32),
    }


def expected_nf4_output(
    inputs: dict[str, np.ndarray], block_size: int, fmt: str = "onnx_nf4", seed: int = 0
) -> np.ndarray:
    """``Y`` computed in numpy with the two rewritten weights decoded from NF4 at ``block_size``.

    ``onnx_nf4`` blocks follow the columns of ``W`` (``docs/MatMulNF4.md``); ``com.microsoft`` blocks run over
    ``W.T`` flattened (``MatMulBnb4``), which differs for the Gemm weight (K = 96 is not a multiple of 64).
    """
    w = _weights(seed)

    def nf4(weight: np.ndarray) -> np.ndarray:
        if fmt == "onnx_nf4":
            return dequantize_weight(quantize_weight(weight, block_size))
        wt = np.ascontiguousarray(weight.T)
        packed, absmax = quantize_blockwise(wt, block_size)
        return dequantize_blockwise(packed, absmax, wt.shape, block_size).T

    h = inputs["X"] @ nf4(w["W"]) + w["bias"]
    g = h @ nf4(np.ascontiguousarray(w["W2"].T)) + w["c2"]
    return (g @ w["Ws"]) @ inputs["Z"]


def run_reference(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    from onnx_nf4.op.reference import MatMulNF4

    return ReferenceEvaluator(str(path), new_ops=[MatMulNF4]).run(["Y"], inputs)[0]


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(path).graph.node]


@pytest.fixture
def float_model(tmp_path: Path) -> Path:
    return make_float_model(tmp_path / "float.onnx")


# ---------------------------------------------------------------------------------------------------------------
# Basics


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"onnx-nf4 {onnx_nf4.__version__}"


def test_no_command_is_a_one_line_usage_error() -> None:
    assert_one_line_error(run_cli(), "required", "--help", status=2)


def test_unknown_option_is_a_one_line_usage_error(float_model: Path, tmp_path: Path) -> None:
    proc = run_cli("quantize", float_model, tmp_path / "o.onnx", "--bits", "3")
    assert_one_line_error(proc, "--bits", "(see 'onnx-nf4 quantize --help')", status=2)


# ---------------------------------------------------------------------------------------------------------------
# quantize / inspect / dequantize round trips


def test_quantize_rewrites_the_constant_weights_and_reports_every_layer(float_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "nf4.onnx"
    proc = run_cli("quantize", float_model, out, "--block-size", "32")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stderr is not a TTY here: no progress bar
    report = proc.stdout
    for fragment in ("mm", "gemm", f"{K}x{N}", f"{N}x{N2}", "rel. RMS error", "block size 32", "bits per weight"):
        assert fragment in report, fragment
    skipped = {line.split()[0]: line for line in report.splitlines() if line.startswith(("small ", "dynamic "))}
    assert "min_elements" in skipped["small"]
    assert "not a constant" in skipped["dynamic"] or "graph input" in skipped["dynamic"]
    assert "size ratio" in report

    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert op_types(out).count("MatMulNF4") == 2
    assert {node.name for node in model.graph.node if node.op_type == "MatMul"} == {"small", "dynamic"}
    inputs = _inputs()
    np.testing.assert_allclose(run_reference(out, inputs), expected_nf4_output(inputs, 32), rtol=1e-4, atol=1e-5)


def test_quantize_com_microsoft_runs_on_stock_onnxruntime(float_model: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "bnb4.onnx"
    proc = run_cli("quantize", float_model, out, "--format", "com.microsoft", "--block-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert op_types(out).count("MatMulBnb4") == 2
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = _inputs()
    np.testing.assert_allclose(
        session.run(["Y"], inputs)[0], expected_nf4_output(inputs, 64, "com.microsoft"), rtol=1e-4, atol=1e-5
    )


def test_quantize_exclude_and_min_elements(float_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "nf4.onnx"
    proc = run_cli("quantize", "--exclude", "^gem", "--exclude", "^nothing$", float_model, out, "--min-elements", "0")
    assert proc.returncode == 0, proc.stderr
    assert sorted(n.name for n in onnx.load(out).graph.node if n.op_type == "MatMulNF4") == ["mm", "small"]
    gemm_line = next(line for line in proc.stdout.splitlines() if line.startswith("gemm "))
    assert "exclude" in gemm_line


def _bits_line(stdout: str) -> float:
    """The bits per weight of ``inspect``'s "quantized weights: ... (X bits per weight)" line."""
    line = next(line for line in stdout.splitlines() if line.startswith("quantized weights:"))
    return float(line.split("(")[-1].split()[0])


def _blocks(K: int, N: int, block_size: int, fmt: str) -> int:
    """Absmax blocks of a ``W[K, N]``: per column of ``W`` (padded) for onnx_nf4, over ``W.T`` flat for MatMulBnb4."""
    return N * -(-K // block_size) if fmt == "onnx_nf4" else -(-K * N // block_size)


@pytest.mark.parametrize("fmt", ["onnx_nf4", "com.microsoft"])
def test_inspect_reports_format_block_size_and_bits_per_weight(float_model: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "q.onnx"
    assert run_cli("quantize", float_model, out, "--format", fmt).returncode == 0
    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "quantized: 2 layer(s)" in proc.stdout
    assert f"format {fmt}," in proc.stdout
    assert "block size 64" in proc.stdout
    assert "float MatMul/Gemm: 2 (1 with a constant weight" in proc.stdout
    # Storage: 4 bits per code (a whole block of codes per block) and one float32 absmax per block.
    shapes = [(K, N), (N, N2)]
    stored = sum(blocks * (32 + 4) for blocks in (_blocks(k, n, 64, fmt) for k, n in shapes))
    assert _bits_line(proc.stdout) == pytest.approx(8 * stored / sum(k * n for k, n in shapes), abs=1e-3)


def test_inspect_double_quant(float_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "dq.onnx"
    assert run_cli("quantize", float_model, out, "--double-quant").returncode == 0
    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "double quantization on 2" in proc.stdout
    # Per block: 32 bytes of codes and a uint8 absmax; per weight: one float32 per 256 absmax and a float32
    # offset; the 256-entry float32 code table once or once per weight (it may be shared).
    shapes = [(K, N), (N, N2)]
    blocks = [_blocks(k, n, 64, "onnx_nf4") for k, n in shapes]
    low = sum(b * (32 + 1) + 4 * -(-b // 256) + 4 for b in blocks) + 1024
    elements = sum(k * n for k, n in shapes)
    assert 8 * low / elements - 1e-3 <= _bits_line(proc.stdout) <= 8 * (low + 1024) / elements + 1e-3


def test_inspect_float_model(float_model: Path) -> None:
    proc = run_cli("inspect", float_model)
    assert proc.returncode == 0, proc.stderr
    assert "quantized: none" in proc.stdout
    assert "float MatMul/Gemm: 4 (3 with a constant weight" in proc.stdout


@pytest.mark.parametrize("fmt", ["onnx_nf4", "com.microsoft"])
def test_dequantize_round_trip(float_model: Path, tmp_path: Path, fmt: str) -> None:
    nf4, back = tmp_path / "nf4.onnx", tmp_path / "back.onnx"
    assert run_cli("quantize", float_model, nf4, "--block-size", "32", "--format", fmt).returncode == 0
    proc = run_cli("dequantize", nf4, back)
    assert proc.returncode == 0, proc.stderr
    assert not {"MatMulNF4", "MatMulBnb4"} & set(op_types(back))
    onnx.checker.check_model(onnx.load(back), full_check=True)
    inputs = _inputs()
    from onnx.reference import ReferenceEvaluator

    got = ReferenceEvaluator(str(back)).run(["Y"], inputs)[0]
    np.testing.assert_allclose(got, expected_nf4_output(inputs, 32, fmt), rtol=1e-4, atol=1e-5)
    assert "quantized: none" in run_cli("inspect", back).stdout


def test_out_equal_to_in_replaces_the_model_and_leaves_no_temporary_file(float_model: Path) -> None:
    proc = run_cli("quantize", float_model, float_model)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in float_model.parent.iterdir()) == [float_model.name]
    onnx.checker.check_model(onnx.load(float_model), full_check=True)
    assert op_types(float_model).count("MatMulNF4") == 2
    inputs = _inputs()
    np.testing.assert_allclose(
        run_reference(float_model, inputs), expected_nf4_output(inputs, 64), rtol=1e-4, atol=1e-5
    )


def test_out_equal_to_in_with_external_data(tmp_path: Path) -> None:
    """A model whose weights live in ``model.onnx.data``: read lazily while the new model is written, then replaced."""
    path = tmp_path / "model.onnx"
    onnx.save(
        onnx.load(make_float_model(tmp_path / "source.onnx")),
        path,
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    (tmp_path / "source.onnx").unlink()
    proc = run_cli("quantize", path, path, "--block-size", "32", "--external-data")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", "model.onnx.data"}
    assert any(
        init.data_location == TensorProto.EXTERNAL
        for init in onnx.load(path, load_external_data=False).graph.initializer
    )
    assert op_types(path).count("MatMulNF4") == 2
    inputs = _inputs()
    np.testing.assert_allclose(run_reference(path, inputs), expected_nf4_output(inputs, 32), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, nothing lost


@pytest.mark.parametrize("command", ["quantize", "inspect", "dequantize"])
def test_missing_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nope.onnx"
    args = [missing] if command == "inspect" else [missing, tmp_path / "out.onnx"]
    assert_one_line_error(run_cli(command, *args), str(missing), "no such file")
    assert not (tmp_path / "out.onnx").exists()


def test_directory_as_input(tmp_path: Path) -> None:
    result = run_cli("quantize", tmp_path, tmp_path / "out.onnx")
    assert_one_line_error(result, str(tmp_path), "is a directory without genai_config.json")


def test_directory_as_output(float_model: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("quantize", float_model, tmp_path), "is a directory")


def test_output_directory_missing(float_model: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("quantize", float_model, tmp_path / "no" / "out.onnx"), "does not exist")


#: Files that the kernel refuses to read even to root (write-only sysctl knobs); used when running as root.
_WRITE_ONLY_FILES = ("/proc/sys/vm/compact_memory", "/proc/sys/vm/drop_caches")


def _unreadable_file(tmp_path: Path, source: Path) -> Path:
    """A file that this process cannot read: a copy with mode 000, or (for root) a write-only kernel file."""
    locked = tmp_path / "locked.onnx"
    shutil.copyfile(source, locked)
    locked.chmod(0)
    for candidate in (locked, *map(Path, _WRITE_ONLY_FILES)):
        try:
            candidate.open("rb").close()
        except PermissionError:
            return candidate
        except OSError:
            continue
    pytest.skip("this user can read a file with mode 000, and no write-only kernel file is available")


def test_unreadable_file(float_model: Path, tmp_path: Path) -> None:
    unreadable = _unreadable_file(tmp_path, float_model)
    assert_one_line_error(run_cli("quantize", unreadable, tmp_path / "out.onnx"), str(unreadable), "Permission denied")
    assert not (tmp_path / "out.onnx").exists()


def test_text_file_is_not_an_onnx_model(tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("These are meeting notes, not a neural network.\n" * 20)
    assert_one_line_error(run_cli("quantize", text, tmp_path / "out.onnx"), str(text), "not an ONNX model")
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_model(float_model: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    data = float_model.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("quantize", truncated, tmp_path / "out.onnx"), str(truncated))
    assert not (tmp_path / "out.onnx").exists()


def test_protobuf_garbage(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_one_line_error(run_cli("inspect", garbage), str(garbage))


@pytest.mark.parametrize("block_size", ["48", "8", "8192", "0", "-64", "sixty-four"])
def test_unsupported_block_size(float_model: Path, tmp_path: Path, block_size: str) -> None:
    proc = run_cli("quantize", float_model, tmp_path / "out.onnx", f"--block-size={block_size}")
    assert_one_line_error(proc, "block size", "power of two between 16 and 4096", status=2)
    assert not (tmp_path / "out.onnx").exists()


def test_invalid_exclude_regex(float_model: Path, tmp_path: Path) -> None:
    proc = run_cli("quantize", float_model, tmp_path / "out.onnx", "--exclude", "(")
    assert_one_line_error(proc, "invalid regular expression", status=2)


def test_double_quant_needs_the_onnx_nf4_format(float_model: Path, tmp_path: Path) -> None:
    proc = run_cli("quantize", float_model, tmp_path / "out.onnx", "--double-quant", "--format", "com.microsoft")
    assert_one_line_error(proc, "--double-quant", "(see 'onnx-nf4 quantize --help')", status=2)


def test_failure_while_writing_out_equal_to_in_leaves_the_input_intact(float_model: Path) -> None:
    """The output cannot be written completely (file size limit, as on a full disk): IN keeps its bytes."""
    before = float_model.read_bytes()

    def limit_file_size() -> None:  # runs in the child: any file write past 2 KiB fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = run_cli("quantize", float_model, float_model, preexec_fn=limit_file_size)
    assert_one_line_error(proc, "File too large")
    assert float_model.read_bytes() == before
    assert sorted(p.name for p in float_model.parent.iterdir()) == [float_model.name]


def test_interrupted_quantization_leaves_the_input_intact(float_model: Path, monkeypatch, capsys) -> None:
    """Ctrl-C during the rewrite (after the first layer): exit status 130, IN untouched, no temporary file."""
    before = float_model.read_bytes()

    def interrupt(self, done: int, total: int, name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", interrupt)
    assert cli.main(["quantize", str(float_model), str(float_model)]) == 130
    assert capsys.readouterr().err == "onnx-nf4: interrupted\n"
    assert float_model.read_bytes() == before
    assert sorted(p.name for p in float_model.parent.iterdir()) == [float_model.name]


# ---------------------------------------------------------------------------------------------------------------
# Progress bar and subcommand registry


def test_progress_bar_counts_layers() -> None:
    stream = io.StringIO()
    with Progress(enabled=True, stream=stream) as progress:
        progress.update(1, 2, "first_weight")
        progress.update(2, 2, "second_weight")
    assert "2/2" in stream.getvalue()
    assert "second_weight" in stream.getvalue()


def test_disabled_progress_bar_writes_nothing() -> None:
    stream = io.StringIO()
    with Progress(enabled=False, stream=stream) as progress:
        progress.update(1, 1, "weight")
    assert stream.getvalue() == ""


def test_subcommand_registered_from_another_module(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "nf4_cli_plugin.py").write_text(
        textwrap.dedent(
            """
            from onnx_nf4.cli.common import CLIError

            def add_hello_parser(subparsers):
                parser = subparsers.add_parser("hello", help="say hello")
                parser.add_argument("name")
                parser.set_defaults(handler=run)

            def run(args):
                if args.name == "nobody":
                    raise CLIError("nobody to greet")
                print(f"hello {args.name}")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    providers = ["nf4_cli_plugin:add_hello_parser", "onnx_nf4_absent_plugin.cli:add_parser"]
    monkeypatch.setattr(cli, "SUBCOMMAND_PROVIDERS", providers)
    assert cli.main(["hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert cli.main(["hello", "nobody"]) == 1
    assert capsys.readouterr().err == "onnx-nf4: error: nobody to greet\n"


def test_subcommand_provider_that_fails_to_import_is_skipped_with_a_warning(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "nf4_broken_plugin.py").write_text("import nf4_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "SUBCOMMAND_PROVIDERS", ["nf4_broken_plugin:add_parser"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out == f"onnx-nf4 {onnx_nf4.__version__}\n"
    assert captured.err.startswith("onnx-nf4: warning: commands of nf4_broken_plugin unavailable (")
