"""LightGBM trees compiled to machine code with LLVM (llvmlite), for exactly the scores ``Booster.predict`` gives.

``Booster.predict`` spends most of its time per row outside the trees (row conversion, buffers, a generic
node walker). :class:`CompiledForest` turns the model's text (the ``model.txt`` of an artifact) into one LLVM
function per tree plus a row loop, compiled in memory at load time: nothing is written to or read from disk,
so there is no compiled object for anyone to swap. It reproduces LightGBM's arithmetic step by step, so the
scores are bit-identical, not merely close:

* an input with ``|x| <= 1e-35`` (LightGBM's ``kZeroThreshold``, a float) is read as 0, as LightGBM's dense
  row conversion does;
* per node, LightGBM's ``NumericalDecision``: with missing type *None* a NaN is read as 0; with *Zero* a 0 or
  NaN takes the node's default side; with *NaN* a NaN takes the default side; otherwise ``x <= threshold``
  goes left;
* tree outputs are summed in tree order from 0.0 in float64, then ``1 / (1 + exp(-sigmoid * raw))`` through
  the C library's ``exp``, as LightGBM's binary objective does.

Only what can be reproduced is compiled: binary objective, one tree per iteration, numerical splits, no linear
trees and no averaged output. Anything else, an absent ``llvmlite``, or ``KEEL_COMPILED_TREES=0`` in the
environment makes :func:`compile_forest` return None, and the caller keeps ``Booster.predict``. As a last guard
:func:`compile_forest` scores probe rows built from every threshold (each threshold, its neighbours, 0, NaN,
tiny values) with both and refuses the compiled forest unless every score is identical.

Example::

    forest = compile_forest(booster.model_to_string(), booster)
    forest.predict(matrix)          # == booster.predict(matrix), bit for bit, several times faster
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import stat
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENV_SWITCH = "KEEL_COMPILED_TREES"
_ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold is the float 1e-35f
_BLOCK = 5  # trees inlined per compiled block
_PARALLEL_ROWS = 20_000  # below this, one call on the calling thread (threads cost more than they save)
_LLVM_LOCK = threading.Lock()  # LLVM's global state is not safe to build from two threads at once


class UnsupportedModel(ValueError):
    """The model uses something the compiler does not reproduce exactly (callers fall back to LightGBM)."""


@dataclass(frozen=True)
class _Tree:
    split_feature: list[int]
    threshold: list[float]
    decision_type: list[int]
    left: list[int]
    right: list[int]
    leaf_value: list[float]


def parse_model(text: str) -> tuple[int, float, list[_Tree]]:
    """``(number of features, sigmoid, trees)`` from LightGBM's text format; :class:`UnsupportedModel` otherwise."""
    header: dict[str, str] = {}
    blocks: list[dict[str, str]] = []
    current = header
    for line in text.splitlines():
        if line.startswith("Tree="):
            current = {}
            blocks.append(current)
            continue
        if line.startswith("end of trees"):
            break
        key, sep, value = line.partition("=")
        if sep:
            current[key.strip()] = value.strip()
        elif line.strip() == "average_output":
            raise UnsupportedModel("averaged output (random forest mode)")
    objective = header.get("objective", "").split()
    if not objective or objective[0] != "binary":
        raise UnsupportedModel(f"objective {header.get('objective')!r} (only binary is compiled)")
    sigmoid = 1.0
    for part in objective[1:]:
        if part.startswith("sigmoid:"):
            sigmoid = float(part.split(":", 1)[1])
    if header.get("num_class", "1") != "1" or header.get("num_tree_per_iteration", "1") != "1":
        raise UnsupportedModel("more than one tree per iteration")
    n_features = int(header["max_feature_idx"]) + 1
    if not blocks:
        raise UnsupportedModel("no trees")
    trees: list[_Tree] = []
    for block in blocks:
        if block.get("num_cat", "0") != "0" or block.get("is_linear", "0") != "0":
            raise UnsupportedModel("categorical splits or linear trees")
        leaves = [float(v) for v in block["leaf_value"].split()]
        if int(block["num_leaves"]) == 1:
            trees.append(_Tree([], [], [], [], [], leaves[:1]))
            continue
        tree = _Tree(
            split_feature=[int(v) for v in block["split_feature"].split()],
            threshold=[float(v) for v in block["threshold"].split()],
            decision_type=[int(v) for v in block["decision_type"].split()],
            left=[int(v) for v in block["left_child"].split()],
            right=[int(v) for v in block["right_child"].split()],
            leaf_value=leaves,
        )
        if any(d & 1 for d in tree.decision_type):
            raise UnsupportedModel("categorical splits")
        if any(not 0 <= f < n_features for f in tree.split_feature):
            raise UnsupportedModel("a split on a feature outside the model's features")
        trees.append(tree)
    return n_features, sigmoid, trees


def _hex(value: float) -> str:
    """A double as LLVM writes it exactly: the IEEE-754 bits in hex."""
    return "0x" + struct.pack(">d", value).hex().upper()


def _tree_ir(t: int, tree: _Tree) -> list[str]:
    lines = [f"define internal double @tree_{t}(double* %row) alwaysinline nounwind {{"]
    if not tree.split_feature:
        return [*lines, f"  ret double {_hex(tree.leaf_value[0])}", "}"]

    def label(child: int) -> str:
        return f"%n{child}" if child >= 0 else f"%l{~child}"

    for i, feature in enumerate(tree.split_feature):
        thr = _hex(tree.threshold[i])
        kind = (tree.decision_type[i] >> 2) & 3  # missing type: 0 None, 1 Zero, 2 NaN
        lines += [
            f"n{i}:",
            f"  %p{i} = getelementptr double, double* %row, i64 {feature}",
            f"  %x{i} = load double, double* %p{i}",
        ]
        if kind == 0:
            # NaN reads as 0: "unordered or <=" when 0 <= threshold, "ordered and <=" otherwise.
            op = "ule" if tree.threshold[i] >= 0.0 else "ole"
            lines.append(f"  %c{i} = fcmp {op} double %x{i}, {thr}")
        else:
            # Zero: 0 (inputs are already snapped) or NaN takes the default side; NaN: NaN does.
            missing = "ueq" if kind == 1 else "uno"
            default = "true" if tree.decision_type[i] & 2 else "false"
            lines += [
                f"  %m{i} = fcmp {missing} double %x{i}, 0.0",
                f"  %le{i} = fcmp ole double %x{i}, {thr}",
                f"  %c{i} = select i1 %m{i}, i1 {default}, i1 %le{i}",
            ]
        lines.append(f"  br i1 %c{i}, label {label(tree.left[i])}, label {label(tree.right[i])}")
    for j, value in enumerate(tree.leaf_value):
        lines += [f"l{j}:", f"  ret double {_hex(value)}"]
    return [*lines, "}"]


def _build_ir(n_features: int, sigmoid: float, trees: list[_Tree]) -> str:
    """LLVM IR text: ``tree_<i>(row)`` per tree and ``keel_predict(x, out, start, end, row_stride, col_stride)``."""
    lines = ["declare double @llvm.fabs.f64(double)", "declare double @exp(double)", ""]
    for t, tree in enumerate(trees):
        lines += [*_tree_ir(t, tree), ""]
    for k in range(0, len(trees), _BLOCK):
        lines += [f"define internal double @block_{k}(double* %row, double %in) noinline nounwind {{"]
        total = "%in"
        for t in range(k, min(k + _BLOCK, len(trees))):
            lines += [f"  %y{t} = call double @tree_{t}(double* %row)", f"  %s{t} = fadd double {total}, %y{t}"]
            total = f"%s{t}"
        lines += [f"  ret double {total}", "}", ""]
    lines += [
        "define void @keel_predict(double* %x, double* %out, i64 %start, i64 %end, i64 %rs, i64 %cs) nounwind {",
        "entry:",
        f"  %buf = alloca double, i64 {n_features}",
        "  br label %loop",
        "loop:",
        "  %r = phi i64 [ %start, %entry ], [ %next, %body ]",
        "  %more = icmp slt i64 %r, %end",
        "  br i1 %more, label %body, label %done",
        "body:",
        "  %base = mul i64 %r, %rs",
    ]
    for j in range(n_features):
        lines += [
            f"  %o{j} = mul i64 {j}, %cs",
            f"  %i{j} = add i64 %base, %o{j}",
            f"  %q{j} = getelementptr double, double* %x, i64 %i{j}",
            f"  %v{j} = load double, double* %q{j}",
            f"  %a{j} = call double @llvm.fabs.f64(double %v{j})",
            f"  %t{j} = fcmp ole double %a{j}, {_hex(_ZERO_THRESHOLD)}",
            f"  %z{j} = select i1 %t{j}, double 0.0, double %v{j}",
            f"  %b{j} = getelementptr double, double* %buf, i64 {j}",
            f"  store double %z{j}, double* %b{j}",
        ]
    # Trees are inlined into blocks of _BLOCK trees that carry the running sum (the same order of additions as
    # LightGBM's): inlining makes the code about twice as fast, blocks keep the compile time about linear.
    total = "0.0"
    for k in range(0, len(trees), _BLOCK):
        lines += [f"  %acc{k} = call double @block_{k}(double* %buf, double {total})"]
        total = f"%acc{k}"
    lines += [
        f"  %neg = fmul double {_hex(-sigmoid)}, {total}",
        "  %e = call double @exp(double %neg)",
        "  %den = fadd double 1.0, %e",
        "  %p = fdiv double 1.0, %den",
        "  %dst = getelementptr double, double* %out, i64 %r",
        "  store double %p, double* %dst",
        "  %next = add i64 %r, 1",
        "  br label %loop",
        "done:",
        "  ret void",
        "}",
    ]
    return "\n".join(lines) + "\n"


_CACHE_FORMAT = "keel-forest-1"


def default_cache() -> Path | None:
    """``$KEEL_CACHE_DIR/trees``, else ``$XDG_CACHE_HOME/keel/trees``, else ``~/.cache/keel/trees``."""
    if not hasattr(os, "getuid"):
        return None  # no ownership to check on this platform: compile in memory every time
    root = os.environ.get("KEEL_CACHE_DIR")
    if root:
        return Path(root) / "trees"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keel" / "trees"


def _private(path: Path) -> bool:
    """Owned by this user and writable by nobody else (so nobody else can have put code there)."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022 and not stat.S_ISLNK(info.st_mode)


def _cache_load(path: Path) -> bytes | None:
    if not (_private(path.parent) and _private(path)):
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, code = data[:64], data[65:]
    if data[64:65] != b"\n" or hashlib.sha256(code).hexdigest().encode() != digest:
        return None
    return code


def _cache_store(path: Path, code: bytes) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(path.parent):
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(hashlib.sha256(code).hexdigest().encode() + b"\n" + bytes(code))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return  # a cache that cannot be written only costs the next load a compile


_ARGS = (None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
_Kernel = ctypes.CFUNCTYPE(*_ARGS)  # releases the GIL: large inputs, and the row-parallel threads
_KernelHoldingGil = ctypes.PYFUNCTYPE(*_ARGS)
# Below this many rows the call keeps the GIL: releasing it costs a single-row request more than the trees do, as the
# thread must win the lock back from the log writer (one row: mean 42 us releasing, 13 us holding, a writer busy).
_GIL_ROWS = 64
_BUFFER_ROWS = 8  # up to this many rows are copied into per-thread buffers (CompiledForest._predict_small)


class CompiledForest:
    """A LightGBM binary model as native code; :meth:`predict` gives ``Booster.predict``'s probabilities.

    Compiling 100 trees of 31 leaves takes about a second; with ``cache`` (a folder) the machine code is kept in
    ``<cache>/<key>.o``, where the key is the SHA-256 of the generated IR, llvmlite's version and the host CPU, and
    the file holds the SHA-256 of its code. A cached file is used only when the folder and the file belong to
    this user and nobody else can write them, and the digest matches; otherwise it is compiled afresh.
    """

    def __init__(self, text: str, cache: Path | None = None) -> None:
        n_features, sigmoid, trees = parse_model(text)
        import llvmlite
        import llvmlite.binding as llvm

        source = _build_ir(n_features, sigmoid, trees)
        with _LLVM_LOCK:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            machine = llvm.Target.from_default_triple().create_target_machine(opt=2, jit=True)
            module = llvm.parse_assembly(source)
            module.triple = llvm.get_process_triple()
            module.data_layout = str(machine.target_data)
            module.verify()
            path = cached = None
            if cache is not None:
                key = hashlib.sha256(
                    "\n".join(
                        [_CACHE_FORMAT, llvmlite.__version__, llvm.get_process_triple(), llvm.get_host_cpu_name(),
                         llvm.get_host_cpu_features().flatten(), source]
                    ).encode()
                ).hexdigest()
                path = cache / f"{key}.o"
                cached = _cache_load(path)
            if cached is None:  # the optimisation passes are most of the compile time: only without a cached object
                builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=2))
                builder.getModulePassManager().run(module, builder)
            engine = llvm.create_mcjit_compiler(module, machine)
            if path is not None:
                target = path
                engine.set_object_cache(
                    lambda _m, code: None if cached is not None else _cache_store(target, code),
                    lambda _m: cached,
                )
            engine.finalize_object()
            address = engine.get_function_address("keel_predict")
        self._engine = engine  # owns the machine code: keep it alive as long as the kernel
        self._kernel = _Kernel(address)
        self._small_kernel = _KernelHoldingGil(address)
        self.n_features = n_features
        self.n_trees = len(trees)
        self._buffers = threading.local()

    def predict(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        """Probabilities for a 2-D float64 array (any strides; rows are read in place, never copied).

        ``threads`` rows-parallel calls (0: every core); the GIL is released while the trees run.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per row, got an array of shape {x.shape}")
        n = x.shape[0]
        if 0 < n <= _BUFFER_ROWS:
            return self._predict_small(x, n)
        out = np.empty(n, dtype=np.float64)
        if n == 0:
            return out
        item = x.itemsize
        if x.strides[0] % item or x.strides[1] % item or x.strides[0] < 0 or x.strides[1] < 0:
            x = np.ascontiguousarray(x)
        rs, cs = x.strides[0] // item, x.strides[1] // item
        xp, op = x.ctypes.data, out.ctypes.data
        workers = min(threads or os.cpu_count() or 1, max(1, n // _PARALLEL_ROWS))
        if workers <= 1:
            (self._small_kernel if n < _GIL_ROWS else self._kernel)(xp, op, 0, n, rs, cs)
            return out
        bounds = np.linspace(0, n, workers + 1).astype(np.int64)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keel-trees") as pool:
            list(pool.map(lambda a, b: self._kernel(xp, op, int(a), int(b), rs, cs), bounds[:-1], bounds[1:]))
        return out

    def _predict_small(self, x: np.ndarray, n: int) -> np.ndarray:
        """A few rows through buffers of this thread whose addresses are taken once: reading an array's address
        (``.ctypes.data``) costs about as much as running the trees over one row."""
        buffers = getattr(self._buffers, "value", None)
        if buffers is None:
            rows, out = np.empty((_BUFFER_ROWS, self.n_features)), np.empty(_BUFFER_ROWS)
            buffers = self._buffers.value = (rows, out, rows.ctypes.data, out.ctypes.data)
        rows, out, xp, op = buffers
        rows[:n] = x
        self._small_kernel(xp, op, 0, n, self.n_features, 1)
        return out[:n].copy()


def _probe_rows(text: str, n_features: int) -> np.ndarray:
    """Rows that visit every threshold from both sides, plus 0, -0, NaN, tiny and huge values per feature."""
    _, _, trees = parse_model(text)
    per_feature: list[set[float]] = [
        {0.0, -0.0, math.nan, _ZERO_THRESHOLD, -_ZERO_THRESHOLD, 1e-40, -1e-40, 1e300, -1e300}
        for _ in range(n_features)
    ]
    for tree in trees:
        for f, thr in zip(tree.split_feature, tree.threshold, strict=True):
            per_feature[f].update((thr, math.nextafter(thr, math.inf), math.nextafter(thr, -math.inf)))
    values = [np.array(sorted(v, key=lambda z: (math.isnan(z), z))) for v in per_feature]
    width = max(len(v) for v in values)
    rng = np.random.default_rng(0)
    rows = np.empty((width * 4, n_features))
    for j, v in enumerate(values):
        rows[:width, j] = np.resize(v, width)  # every value at least once per feature
        rows[width:, j] = rng.choice(v, size=width * 3)  # and in random combinations
    return rows


def compile_forest(text: str, booster: Any, *, cache: Path | bool = True) -> CompiledForest | None:
    """A :class:`CompiledForest` whose scores equal ``booster.predict`` on probe rows, or None.

    ``cache``: True for :func:`default_cache`, a folder, or False to compile in memory only.

    None when ``KEEL_COMPILED_TREES=0``, llvmlite is missing, the model uses something not compiled, or a
    probe row scores differently (never expected; the guard keeps scores identical whatever happens).
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import llvmlite  # noqa: F401
    except ImportError:
        return None
    try:
        folder = default_cache() if cache is True else (cache or None)
        forest = CompiledForest(text, cache=folder)
        probe = _probe_rows(text, forest.n_features)
    except (UnsupportedModel, KeyError, ValueError, RuntimeError, AttributeError):
        return None
    expected = np.asarray(booster.predict(probe, num_threads=1), dtype=np.float64)
    if not np.array_equal(forest.predict(probe, threads=1), expected):
        return None
    return forest


__all__ = ["ENV_SWITCH", "CompiledForest", "UnsupportedModel", "compile_forest", "default_cache", "parse_model"]
