"""A security scan of a model's files that never loads them.

Loading a pickle-family file (pickle, joblib, PyTorch) runs whatever callables it names, so the only safe
time to judge one is before anything loads it. This module reads the bytes and decides from them alone:

* the format comes from the content (magic bytes and a pickle parse), never from the extension alone,
  so a pickle named ``input_example.json`` is scanned as the pickle it is;
* a pickle passes only if every global it imports is on the allow-list and none is refused (refusal
  wins); picklescan's own "dangerous" verdict also fails it; a joblib file must also be safe when read
  by a plain ``pickle.load`` (which reads array bytes as opcodes), not only by ``joblib.load``;
* a skops file passes only if every type it holds is one skops trusts or the policy lists as reviewed;
* text passes (it cannot execute on load); anything the gate cannot read fails, never passes.

Nothing here imports Airflow or MLflow (the gate runs it inside Airflow tasks, and skops' type checks
touch module attributes that would trip Airflow's lazy deprecated imports).

Limits, stated so nobody relies on more:

* Pickles nested *inside* a pickle's data (e.g. a ``bytes`` value that some ``__setstate__`` later
  unpickles) are not scanned; an allow-list that admits no unpickling callables is the defence
  (``*.load``/``*.loads``/``*.read_pickle`` are refused by default). The one nested stream the gate does
  follow is joblib's object-dtype array, which joblib itself unpickles.
* Legacy (pre-1.6, non-zip) PyTorch files (several pickles followed by raw storage bytes), lz4-compressed
  joblib files, ``.npy``, ONNX, safetensors and other binary formats are not read: they fail as
  formats the gate does not know.
* TorchScript zips are scanned like PyTorch zips (their ``.pkl`` members); their TorchScript code is not.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import gzip
import logging
import lzma
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

# --- policy ---------------------------------------------------------------------------------------------

DEFAULT_ALLOWED_GLOBALS: tuple[str, ...] = (
    # Python built-ins that plain data needs (protocol 0-2 pickles name them "__builtin__", which Python 3
    # maps to "builtins" before the check).
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    "builtins.range",
    "builtins.complex",
    "builtins.bytearray",
    "builtins.bytes",
    "builtins.object",
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.int",
    "builtins.float",
    "builtins.bool",
    "builtins.str",
    "copyreg._reconstructor",  # how protocol 0/1 pickles rebuild ordinary objects
    "_codecs.encode",  # how protocol 0-2 pickles carry bytes
    "collections.OrderedDict",
    "collections.defaultdict",
    "collections.Counter",
    "collections.deque",
    "datetime.date",
    "datetime.datetime",
    "datetime.time",
    "datetime.timedelta",
    "datetime.timezone",
    "decimal.Decimal",
    "fractions.Fraction",
    # numpy: arrays, dtypes, scalars and random generators, by exact name (numpy also holds numpy.load,
    # numpy.testing's runstring and numpy.f2py's eval helpers, so "numpy.*" would be too wide).
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.numeric._frombuffer",
    "numpy._core.numeric._frombuffer",
    "numpy.ma.core._mareconstruct",
    "numpy.ma.core.MaskedArray",
    "numpy.dtypes.*",
    "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor",
    "numpy.random._pickle.__randomstate_ctor",
    "numpy.random.bit_generator.SeedSequence",
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
    "numpy.random._pcg64.PCG64",
    "numpy.random._pcg64.PCG64DXSM",
    "numpy.random._mt19937.MT19937",
    "numpy.random._philox.Philox",
    "numpy.random._sfc64.SFC64",
    "numpy.random._generator.Generator",
    "numpy.random.mtrand.RandomState",
    # scipy sparse matrices and arrays (sklearn's sparse outputs and fitted attributes).
    "scipy.sparse._csr.*",
    "scipy.sparse._csc.*",
    "scipy.sparse._coo.*",
    "scipy.sparse._lil.*",
    "scipy.sparse._dok.*",
    "scipy.sparse._bsr.*",
    "scipy.sparse._dia.*",
    # scikit-learn estimators and their fitted parts live all over the package; the refuse-list carves
    # out its test helpers, dataset downloaders and vendored code.
    "sklearn.*",
    "joblib.numpy_pickle.NumpyArrayWrapper",
    # pandas frames/series/indexes (pandas.core.computation, which evaluates expressions, is refused).
    "pandas.core.*",
    "pandas._libs.*",
    # PyTorch state dicts: tensors, storages, dtypes, sizes, devices.
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Size",
    "torch.device",
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
    *(
        f"torch.{kind}Storage"
        for kind in (
            "Float",
            "Double",
            "Half",
            "BFloat16",
            "Long",
            "Int",
            "Short",
            "Char",
            "Byte",
            "Bool",
            "ComplexFloat",
            "ComplexDouble",
        )
    ),
    *(
        f"torch.{dtype}"
        for dtype in (
            "float16",
            "bfloat16",
            "float32",
            "float64",
            "complex64",
            "complex128",
            "uint8",
            "int8",
            "int16",
            "int32",
            "int64",
            "bool",
        )
    ),
)
"""Globals a pickle may import: enough for scikit-learn, numpy, scipy, pandas, joblib and PyTorch state
dicts. ``module.name`` is exact; ``module.*`` admits every plain name of the module and its submodules."""

DEFAULT_REFUSED_GLOBALS: tuple[str, ...] = (
    # processes, shells, the OS
    "os.*",
    "posix.*",
    "nt.*",
    "subprocess.*",
    "_posixsubprocess.*",
    "pty.*",
    "shutil.*",
    "sys.*",
    "ctypes.*",
    "_ctypes.*",
    "multiprocessing.*",
    "asyncio.*",
    "signal.*",
    # code execution and import machinery
    *(
        f"builtins.{name}"
        for name in (
            "eval",
            "exec",
            "compile",
            "open",
            "__import__",
            "getattr",
            "setattr",
            "delattr",
            "globals",
            "locals",
            "vars",
            "input",
            "breakpoint",
            "help",
            "exit",
            "quit",
            "memoryview",
            "type",
        )
    ),
    "importlib.*",
    "runpy.*",
    "pkgutil.*",
    "pydoc.*",
    "code.*",
    "codeop.*",
    "types.*",
    "marshal.*",
    "pdb.*",
    "bdb.*",
    "profile.*",
    "cProfile.*",
    "timeit.*",
    "trace.*",
    "doctest.*",
    "venv.*",
    "ensurepip.*",
    "pip.*",
    "idlelib.*",
    # nested deserialization: a pickle that loads another file or blob escapes this scan
    "pickle.*",
    "_pickle.*",
    "cloudpickle.*",
    "dill.*",
    "shelve.*",
    "dbm.*",
    "*.load",
    "*.loads",
    "*.read_pickle",
    # the network
    "socket.*",
    "_socket.*",
    "ssl.*",
    "requests.*",
    "urllib.*",
    "urllib3.*",
    "http.*",
    "httpx.*",
    "aiohttp.*",
    "ftplib.*",
    "smtplib.*",
    "telnetlib.*",
    "imaplib.*",
    "poplib.*",
    "webbrowser.*",
    # files
    "io.*",
    "_io.*",
    "tempfile.*",
    "logging.*",
    # callables that call other callables: they chain an allowed name into an arbitrary call
    # (operator.attrgetter("system")(module) is os.system). functools.partial is refused too: it binds
    # arguments to any callable for a later call, no model format here needs it, and picklescan flags it.
    "operator.attrgetter",
    "operator.methodcaller",
    "operator.itemgetter",
    "_operator.attrgetter",
    "_operator.methodcaller",
    "_operator.itemgetter",
    "functools.partial",
    "functools.reduce",
    "_functools.*",
    # names that execute, whichever module re-exports them
    "*.system",
    "*.popen",
    "*.Popen",
    "*.eval",
    "*.exec",
    "*.exec_command",
    "*.runstring",
    "*.__import__",
    # corners of allowed packages that reach the above
    "numpy.testing.*",
    "numpy.f2py.*",
    "numpy.distutils.*",
    "numpy.ctypeslib.*",
    "pandas.core.computation.*",
    "pandas.io.*",
    "sklearn.utils._testing.*",
    "sklearn.datasets.*",
    "sklearn.externals.*",
    "torch.serialization.*",
    "torch.hub.*",
    "torch.jit.*",
    "torch._inductor.*",
    "torch._dynamo.*",
)
"""Globals refused even when an allow pattern admits them. ``*.name`` refuses a name in any module."""

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".ckpt", ".cloudpickle"})
"""Extensions always treated as pickle-family: a file so named fails unless it parses as a clean pickle."""

MAX_PICKLESCAN_BYTES = 1024**3
"""picklescan keeps every opcode of a stream in memory, so it is only run on streams up to 1 GiB."""

MAX_STREAM_BYTES = 2 * 1024**3
"""The largest pickle stream (plain, decompressed or zip member) the gate follows; larger ones fail."""

MAX_ZIP_DEPTH = 3
"""Zips inside zips are followed this deep; deeper nesting fails."""

WALKER = "stdlib pickletools (joblib-aware)"

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ScanPolicy:
    """What a scanned file may contain.

    Patterns are ``module.name`` (exact), ``module.*`` (every plain name of the module and its submodules;
    a dotted, attribute-walking name such as ``path.join`` needs an exact entry) or ``*.name`` (that name
    in any module, meant for refusals). A refused pattern fails a global even if an allowed one admits it.
    """

    allowed_globals: tuple[str, ...] = DEFAULT_ALLOWED_GLOBALS
    refused_globals: tuple[str, ...] = DEFAULT_REFUSED_GLOBALS
    skops_trusted_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileScan:
    """One file's verdict.

    ``path`` is relative to the scanned folder (posix). ``detail`` is one line and quotes nothing from the
    file beyond module and type names. ``imports`` are the ``module.name`` globals a pickle imports (the
    name Python 3 resolves), or the types a skops file holds, sorted and unique. ``scanner`` names the
    tool whose reading decided.
    """

    path: str
    format: str
    passed: bool
    detail: str
    imports: tuple[str, ...] = ()
    scanner: str = ""


def scan_folder(folder: Path, policy: ScanPolicy) -> list[FileScan]:
    """Scan every regular file under ``folder`` recursively, sorted by path.

    Symbolic links (to files or folders) are failures and are not followed: one could point outside the
    model, and what it points to could change after the scan.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder (symbolic links are not followed)")
    scans: list[FileScan] = []

    def _unlistable(error: OSError) -> None:  # a folder the gate cannot list fails, it is not skipped
        where = Path(error.filename) if error.filename else folder
        scans.append(
            FileScan(_relative(where, folder), "unreadable", False, "a folder that cannot be listed")
        )

    for base, dirs, files in os.walk(folder, onerror=_unlistable):
        base_path = Path(base)
        for name in list(dirs):
            if (base_path / name).is_symlink():
                dirs.remove(name)
                scans.append(scan_file(base_path / name, folder, policy))
        scans.extend(scan_file(base_path / name, folder, policy) for name in files)
    return sorted(scans, key=lambda scan: scan.path)


def scan_file(path: Path, root: Path, policy: ScanPolicy) -> FileScan:
    """Scan one file without loading it. Never raises for a file's content: an unreadable file fails."""
    path = Path(path)
    rel = _relative(path, Path(root))
    try:
        info = path.lstat()
    except OSError as exc:
        return FileScan(rel, "unreadable", False, f"cannot be read ({type(exc).__name__})")
    if stat.S_ISLNK(info.st_mode):
        return FileScan(
            rel, "symlink", False, "a symbolic link: not followed (it could point outside the model)"
        )
    if not stat.S_ISREG(info.st_mode):
        return FileScan(rel, "special", False, "not a regular file")
    try:
        with open(path, "rb") as handle:
            verdict = _scan_stream(handle, info.st_size, path.suffix.lower(), policy, depth=0, disk_path=path)
    except OSError as exc:
        return FileScan(rel, "unreadable", False, f"cannot be read ({type(exc).__name__})")
    except Exception as exc:  # a file that breaks the scanner fails; it never passes by default
        return FileScan(rel, "unreadable", False, f"the scan could not finish ({type(exc).__name__})")
    return FileScan(
        rel,
        verdict.format,
        verdict.passed,
        verdict.detail,
        tuple(sorted(set(verdict.imports))),
        verdict.scanner,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# --- dispatch by content --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    format: str
    passed: bool
    detail: str
    imports: tuple[str, ...] = ()
    scanner: str = ""


def _fail(fmt: str, detail: str, scanner: str = "") -> _Verdict:
    return _Verdict(fmt, False, detail, (), scanner)


def _scan_stream(
    handle: IO[bytes], size: int, suffix: str, policy: ScanPolicy, depth: int, disk_path: Path | None = None
) -> _Verdict:
    """Decide one seekable byte stream's format from its content and scan it as that format."""
    if depth > MAX_ZIP_DEPTH + 1:
        return _fail("binary", "compressed or archived more deeply than the gate follows")
    handle.seek(0)
    head = handle.read(16)
    handle.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _scan_zip(handle, policy, depth, disk_path)
    compression = _compression(head)
    if compression is not None:
        inflated = _decompressed(handle, compression)
        if isinstance(inflated, str):  # an error: it is not that compressed format after all
            if not _is_utf8(handle):
                return _fail(
                    "binary", f"looks {compression}-compressed but cannot be decompressed: {inflated}"
                )
        else:
            with inflated as (temp, inflated_size):
                inner = _scan_stream(temp, inflated_size, suffix, policy, depth + 1)
            return replace(inner, detail=f"{compression}-compressed; {inner.detail}")
    if suffix in PICKLE_SUFFIXES or head.startswith(b"\x80"):
        return _scan_pickle(handle, size, policy)
    if _is_utf8(handle):
        if _text_could_unpickle(handle, policy):
            return _scan_pickle(handle, size, policy)
        return _Verdict("text", True, "text: no executable serialization")
    if _walk(handle, size, joblib=False).error is None:  # a protocol 0/1 binary pickle
        return _scan_pickle(handle, size, policy)
    return _fail("binary", "cannot be scanned; not a format the gate knows")


def _compression(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x5d\x00\x00"):  # joblib's lzma ("alone") format
        return "lzma"
    if len(head) >= 2 and head[0] == 0x78 and ((head[0] << 8) | head[1]) % 31 == 0 and not head[1] & 0x20:
        return "zlib"
    return None


class _Inflated:
    """A bounded temporary copy of a decompressed stream (context manager yielding (file, size))."""

    def __init__(self, temp: IO[bytes], size: int) -> None:
        self._temp, self._size = temp, size

    def __enter__(self) -> tuple[IO[bytes], int]:
        return self._temp, self._size

    def __exit__(self, *exc: object) -> None:
        self._temp.close()


def _decompressed(handle: IO[bytes], compression: str) -> _Inflated | str:
    """Decompress into a temporary file, refusing more than MAX_STREAM_BYTES; an error message if not."""
    handle.seek(0)
    temp = tempfile.TemporaryFile(prefix="modelops-filescan-")
    total = 0
    try:
        if compression == "zlib":
            inflater = zlib.decompressobj()
            while not inflater.eof:
                data = inflater.unconsumed_tail or handle.read(_CHUNK)
                if not data:
                    raise EOFError("truncated zlib stream")
                out = inflater.decompress(data, _CHUNK)
                total += len(out)
                if total > MAX_STREAM_BYTES:
                    raise OverflowError
                temp.write(out)
        else:
            stream: Any
            if compression == "gzip":
                stream = gzip.GzipFile(fileobj=handle)
            elif compression == "bz2":
                stream = bz2.BZ2File(handle)
            else:
                stream = lzma.LZMAFile(handle)
            with stream:
                while chunk := stream.read(_CHUNK):
                    total += len(chunk)
                    if total > MAX_STREAM_BYTES:
                        raise OverflowError
                    temp.write(chunk)
    except OverflowError:
        temp.close()
        return f"decompresses to more than {MAX_STREAM_BYTES} bytes"
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        temp.close()
        handle.seek(0)
        return f"{type(exc).__name__}"
    temp.seek(0)
    return _Inflated(temp, total)


def _is_utf8(handle: IO[bytes]) -> bool:
    """Whether the whole stream decodes as UTF-8 (streamed, so any size is fine)."""
    handle.seek(0)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        while chunk := handle.read(_CHUNK):
            decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    finally:
        handle.seek(0)
    return True


def _is_dotted_identifier(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _policy_modules(policy: ScanPolicy) -> frozenset[str]:
    """The top-level packages the policy names (so they count as importable even if not installed here)."""
    return frozenset(p.split(".")[0] for p in (*policy.allowed_globals, *policy.refused_globals))


def _could_import(module: str, name: str, named: frozenset[str]) -> bool:
    """Whether an unpickler could import module.name: identifiers, and a package installed or named."""
    if not (_is_dotted_identifier(module) and _is_dotted_identifier(name)):
        return False
    top = module.split(".")[0]
    if top in named:
        return True
    return _installed(top)


@functools.lru_cache(maxsize=1024)
def _installed(top: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(top) is not None  # finds a top-level package; imports nothing
    except (ImportError, ValueError):
        return False


def _text_could_unpickle(handle: IO[bytes], policy: ScanPolicy) -> bool:
    """Whether a UTF-8 file, read as a pickle, imports anything before the parse gives up.

    Protocol 0 pickles are ASCII, so text can be a pickle; and an unpickler runs each call as it reads
    it, so a stream that breaks *after* ``cos\\nsystem\\n...R`` has already run os.system. Ordinary text
    trips the parser within a few bytes. A GLOBAL/INST naming a module an unpickler could import (its
    module and name are Python identifiers and its top-level package is installed here or named by the
    policy), or any STACK_GLOBAL/EXT opcode, means the file is scanned as a pickle: the worst case for
    real text is a false alarm, never a pass. (A requirements.txt starting "cloudpickle\nnumpy\n" reads
    as GLOBAL "loudpickle numpy", which no unpickler can import, so it stays text.)
    """
    import pickletools

    named = _policy_modules(policy)

    handle.seek(0)
    try:
        while True:
            for opcode, arg, _pos in pickletools.genops(handle):
                if opcode.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    if _could_import(module, name, named):
                        return True
                elif opcode.name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
                    return True
            if not handle.read(1):
                return False
            handle.seek(-1, 1)
    except (ValueError, EOFError, struct.error):
        # The parse gave up: an unpickler stops at the same place, and what came before imported nothing.
        return False
    finally:
        handle.seek(0)


# --- pickles --------------------------------------------------------------------------------------------


def _picklescan_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"picklescan {version('picklescan')}"
    except PackageNotFoundError:  # pragma: no cover - picklescan is a dependency
        return "picklescan"


def _scan_pickle(handle: IO[bytes], size: int, policy: ScanPolicy) -> _Verdict:
    """Scan a pickle-family stream: picklescan where it can parse it, the joblib-aware walker always.

    picklescan lists the globals and gives its own verdict, but it reads a joblib file's raw numpy bytes as
    opcodes and fails (or worse, would list junk), and when it cannot parse a stream with no globals it
    reports an empty, error-free result. So the stdlib walker below runs on every stream too: it must
    parse the stream for the file to pass, its stricter STACK_GLOBAL resolution adds to the imports, and
    where picklescan cannot parse the stream (joblib's raw buffers) the walker alone decides.
    """
    if size > MAX_STREAM_BYTES:
        return _fail("pickle", f"too large to scan ({size} bytes; the limit is {MAX_STREAM_BYTES})")
    from picklescan.scanner import SafetyLevel, scan_pickle_bytes

    scanned = None
    if size <= MAX_PICKLESCAN_BYTES:
        handle.seek(0)
        try:
            with _quiet_picklescan():
                scanned = scan_pickle_bytes(handle, "model file")
        except Exception:  # picklescan could not read it: the walker decides
            scanned = None
    walk = _walk(handle, size, joblib=True)
    fmt = "joblib" if walk.arrays or any(m.startswith("joblib.") for m, _ in walk.effective) else "pickle"
    ps_parsed = (
        scanned is not None
        and not scanned.scan_err
        and (bool(scanned.globals) or walk.error is None)
        and not walk.arrays  # raw array bytes read as opcodes mean nothing
    )
    if walk.error is not None:
        # Name what it imports before the failure too: an unpickler runs those calls before it fails.
        seen = sorted(
            {
                _show(f"{m}.{n}")
                for m, n in walk.effective
                if not _allowed(m, n, policy) or _refused(m, n, policy)
            }
        )
        before = f"; before that it imports unsafe globals: {', '.join(seen)}" if seen else ""
        if walk.unresolved:
            return _fail(fmt, walk.error + before, WALKER)
        if ps_parsed:
            return _fail(
                fmt, f"picklescan parsed it but the stdlib walker could not: {walk.error}{before}", WALKER
            )
        detail = f"not a readable pickle (neither picklescan nor the walker parses it): {walk.error}{before}"
        return _fail(fmt, detail)

    if walk.exposed:
        # joblib.load reads the bytes after an array header as array data, but pickle.load (what a
        # pickle/cloudpickle loader does with a file of this name) reads them as opcodes. joblib >= 1.2
        # starts them with a padding-length byte (1-16) that is no opcode, so a plain unpickler stops at
        # the first array; files without the padding (older joblib, non-seekable targets, or crafted)
        # could hide a second program in "array data". Read such a stream as a plain unpickler would.
        # (Random array bytes rarely look like an import of an installed package; if they do, the file
        # fails: a false alarm on an old joblib file, never a pass.)
        plain = _walk(handle, size, joblib=False, probe_modules=_policy_modules(policy))
        if plain.unresolved:
            return _fail(fmt, f"read by a plain unpickler, its array bytes: {plain.error}", WALKER)
        hidden = sorted(
            {
                _show(f"{m}.{n}")
                for m, n in plain.effective - walk.effective
                if _refused(m, n, policy) or not _allowed(m, n, policy)
            }
        )
        if hidden:
            detail = f"read by a plain unpickler, its array bytes import unsafe globals: {', '.join(hidden)}"
            return _Verdict(
                fmt, False, detail, tuple(sorted({_show(f"{m}.{n}") for m, n in walk.effective})), WALKER
            )

    scanner = _picklescan_version() if ps_parsed else WALKER
    checked: set[tuple[str, str]] = set(walk.raw) | set(walk.effective)  # for refusals: every spelling
    resolved: set[tuple[str, str]] = set(walk.effective)  # for the allow-list: what Python 3 imports
    dangerous: list[str] = []
    if ps_parsed and scanned is not None:
        for found in scanned.globals:
            checked.add((found.module, found.name))
            checked.add(_py3_name(found.module, found.name))
            resolved.add(_py3_name(found.module, found.name))
            if found.safety == SafetyLevel.Dangerous:
                dangerous.append(_show(f"{found.module}.{found.name}"))
    imports = tuple(sorted({_show(f"{m}.{n}") for m, n in walk.effective}))
    refused = sorted({_show(f"{m}.{n}") for m, n in checked if _refused(m, n, policy)})
    unallowed = sorted({_show(f"{m}.{n}") for m, n in resolved if not _allowed(m, n, policy)})
    label = "joblib pickle" if fmt == "joblib" else "pickle"
    if refused:
        return _Verdict(
            fmt, False, f"{label} imports refused globals: {', '.join(refused)}", imports, scanner
        )
    if dangerous:
        detail = f"{label}: picklescan flags dangerous imports: {', '.join(sorted(set(dangerous)))}"
        return _Verdict(fmt, False, detail, imports, scanner)
    if unallowed:
        detail = f"{label} imports globals outside the allow-list: {', '.join(unallowed)}"
        return _Verdict(fmt, False, detail, imports, scanner)
    arrays = f", {walk.arrays} raw numpy buffers skipped" if walk.arrays else ""
    detail = f"{label}: {len(imports)} imported globals, all allowed{arrays}"
    return _Verdict(fmt, True, detail, imports, scanner)


@contextmanager
def _quiet_picklescan() -> Iterator[None]:
    """picklescan logs every joblib file it cannot parse at ERROR; here that is expected, not an error."""
    logger = logging.getLogger("picklescan")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """The name Python 3's unpickler resolves for a protocol 0-2 pickle (Python 2 names are mapped)."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _matches(pattern: str, module: str, name: str, *, refusing: bool) -> bool:
    full = f"{module}.{name}"
    if pattern.startswith("*."):
        return pattern[2:] in name.split(".")
    if pattern.endswith(".*"):
        prefix = pattern[:-2]
        if refusing:  # any name under the prefix, dotted or not
            return full.startswith(prefix + ".")
        in_module = module == prefix or module.startswith(prefix + ".")
        return in_module and "." not in name  # a dotted name walks attributes: it needs an exact entry
    return full == pattern


def _allowed(module: str, name: str, policy: ScanPolicy) -> bool:
    return any(_matches(p, module, name, refusing=False) for p in policy.allowed_globals)


def _refused(module: str, name: str, policy: ScanPolicy) -> bool:
    return any(_matches(p, module, name, refusing=True) for p in policy.refused_globals)


def _show(text: str, limit: int = 120) -> str:
    """A module/type name fit for a one-line message (control characters escaped, long names cut)."""
    if text.isprintable() and len(text) <= limit:
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


# --- the hand-written walker ----------------------------------------------------------------------------
#
# Why hand-written: picklescan 1.0.5 fails to parse joblib files with raw numpy buffers (joblib writes an
# array's bytes inline, right after the BUILD of a NumpyArrayWrapper, and a plain opcode parser reads them
# as opcodes); modelscan 0.8.8 errors on numpy 2.4; fickling's is_likely_safe calls a benign scikit-learn
# pickle unsafe. So this walker follows the stream the way joblib's unpickler does, on stdlib
# pickletools.genops, and simulates the unpickler's stack and memo symbolically (it calls nothing): that is
# what lets it resolve STACK_GLOBAL's arguments exactly and read a NumpyArrayWrapper's shape and dtype to
# know how many bytes to skip.


class _Mark:
    """The MARK opcode's stack marker."""


class _Unknown:
    """A value the walker does not model (bytes, floats' containers, call results it cannot know)."""


_MARK = _Mark()
_UNKNOWN = _Unknown()


@dataclass(eq=False)
class _Global:
    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class _Obj:
    """The result of a call (REDUCE, NEWOBJ, OBJ, INST) and the state BUILD gave it."""

    factory: object
    args: object
    state: object = None
    attrs: dict[Any, Any] = field(default_factory=dict)
    attrs_known: bool = True


@dataclass
class _Walk:
    error: str | None = None
    unresolved: bool = False  # it imports something the walker cannot name: fail whatever else holds
    raw: set[tuple[str, str]] = field(default_factory=set)
    effective: set[tuple[str, str]] = field(default_factory=set)
    arrays: int = 0
    # Whether a plain unpickler (pickle.load) would read on past the first array header: the byte after it
    # is an opcode rather than joblib's padding-length byte (1-16, which is none) or a nested pickle.
    exposed: bool = False
    # Probe mode reads bytes that may be junk (joblib array data as a plain unpickler would): an import an
    # unpickler could not perform (a name that is no identifier, a package not installed or named by the
    # policy) ends the walk as a parse failure, like the ImportError it would be, instead of counting.
    probe_modules: frozenset[str] | None = None


class _Persistent:
    """What persistent_load returns (PERSID/BINPERSID): loader-defined, so it could even be a string."""


_PERSISTENT = _Persistent()


class _WalkError(Exception):
    def __init__(self, message: str, unresolved: bool = False) -> None:
        super().__init__(message)
        self.unresolved = unresolved


_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_NUMBER_OPS = frozenset(
    {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
)


def _walk(
    handle: IO[bytes], size: int, *, joblib: bool, probe_modules: frozenset[str] | None = None
) -> _Walk:
    """Walk every pickle in the stream (one after another, as picklescan does) without loading anything."""
    result = _Walk(probe_modules=probe_modules)
    handle.seek(0)
    memo: dict[Any, Any] = {}
    try:
        while True:
            _walk_one(handle, size, result, memo, joblib=joblib, depth=0)
            if not handle.read(1):
                break
            handle.seek(-1, 1)
    except _WalkError as exc:
        result.error = str(exc)
        result.unresolved = exc.unresolved
    except RecursionError:
        result.error = "nested too deeply to follow"
    finally:
        handle.seek(0)
    return result


def _walk_one(
    handle: IO[bytes], size: int, result: _Walk, memo: dict[Any, Any], *, joblib: bool, depth: int
) -> None:
    """Walk one pickle up to its STOP; after a joblib array wrapper's BUILD, skip the array bytes."""
    import pickletools

    stack: list[Any] = []
    proto = 0
    pos: int | None = None
    while True:
        restart = False
        try:
            for opcode, arg, pos in pickletools.genops(handle):
                name = opcode.name
                if name == "PROTO":
                    proto = arg
                elif name in _STRING_OPS:
                    stack.append(arg)
                elif name in _NUMBER_OPS:
                    stack.append(arg)
                elif name == "NONE":
                    stack.append(None)
                elif name in ("NEWTRUE", "NEWFALSE"):
                    stack.append(name == "NEWTRUE")
                elif name == "MARK":
                    stack.append(_MARK)
                elif name == "EMPTY_TUPLE":
                    stack.append(())
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                    items = [_pop(stack) for _ in range(int(name[-1]))]
                    stack.append(tuple(reversed(items)))
                elif name == "TUPLE":
                    stack.append(tuple(_pop_mark(stack)))
                elif name == "EMPTY_LIST":
                    stack.append([])
                elif name == "LIST":
                    stack.append(_pop_mark(stack))
                elif name == "APPEND":
                    value = _pop(stack)
                    if isinstance(_top(stack), list):
                        _top(stack).append(value)
                elif name == "APPENDS":
                    values = _pop_mark(stack)
                    if isinstance(_top(stack), list):
                        _top(stack).extend(values)
                elif name == "EMPTY_DICT":
                    stack.append({})
                elif name == "DICT":
                    items = _pop_mark(stack)
                    stack.append(_dict_from(items[0::2], items[1::2]))
                elif name == "SETITEM":
                    value, key = _pop(stack), _pop(stack)
                    _set_items(_top(stack), [key], [value])
                elif name == "SETITEMS":
                    items = _pop_mark(stack)
                    _set_items(_top(stack), items[0::2], items[1::2])
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = _top(stack)
                elif name == "MEMOIZE":
                    memo[len(memo)] = _top(stack)
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    if arg not in memo:
                        raise _WalkError(f"refers to a memo entry it never stored (at byte {pos})")
                    stack.append(memo[arg])
                elif name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found = _record(result, module, attr, proto)
                    if name == "INST":
                        stack.append(_Obj(found, tuple(_pop_mark(stack))))
                    else:
                        stack.append(found)
                elif name == "STACK_GLOBAL":
                    attr, module = _pop(stack), _pop(stack)
                    if not isinstance(module, str) or not isinstance(attr, str):
                        if all(_could_be_str(v) for v in (module, attr)):
                            raise _WalkError(
                                f"STACK_GLOBAL at byte {pos} takes names computed at load time: "
                                "cannot tell what it imports",
                                unresolved=True,
                            )
                        # numbers, bytes, containers: the unpickler refuses them ("requires str")
                        raise _WalkError(f"STACK_GLOBAL on values that are not strings at byte {pos}")
                    stack.append(_record(result, module, attr, proto))
                elif name in ("EXT1", "EXT2", "EXT4"):
                    if result.probe_modules is not None:  # copyreg's extension registry is empty by
                        raise _WalkError(f"{name} at byte {pos}")  # default: an unpickler fails here
                    raise _WalkError(
                        f"imports through the copyreg extension registry ({name} at byte {pos}): "
                        "cannot tell what it imports",
                        unresolved=True,
                    )
                elif name in ("REDUCE", "NEWOBJ"):
                    args = _pop(stack)
                    stack.append(_Obj(_callable(_pop(stack), pos), args))
                elif name == "NEWOBJ_EX":
                    _pop(stack)  # kwargs
                    args = _pop(stack)
                    stack.append(_Obj(_callable(_pop(stack), pos), args))
                elif name == "OBJ":
                    items = _pop_mark(stack)
                    if not items:
                        raise _WalkError(f"OBJ without a class at byte {pos}")
                    stack.append(_Obj(_callable(items[0], pos), tuple(items[1:])))
                elif name in ("PERSID", "BINPERSID"):
                    if name == "BINPERSID":
                        _pop(stack)
                    stack.append(_PERSISTENT)
                elif name == "BUILD":
                    state = _pop(stack)
                    target = _top(stack)
                    if isinstance(target, _Obj):
                        _build(target, state)
                        if joblib and _is_array_wrapper(target):
                            _skip_array(handle, size, target, result, memo, depth)
                            stack[-1] = _UNKNOWN  # joblib puts the array where the wrapper was
                            restart = True
                            break
                elif name == "POP":
                    if stack and stack[-1] is _MARK:
                        stack.pop()
                    else:
                        _pop(stack)
                elif name == "DUP":
                    stack.append(_top(stack))
                elif name == "STOP":
                    _pop(stack)
                    return
                else:  # FRAME, bytes, sets, buffers, persistent ids: only their stack effect matters
                    _generic(stack, opcode)
        except _WalkError:
            raise
        except Exception as exc:  # genops' own parse errors (ValueError, struct errors, EOF)
            where = f" after the opcode at byte {pos}" if pos is not None else ""
            raise _WalkError(f"not a complete pickle stream ({type(exc).__name__}{where})") from None
        if not restart:
            raise _WalkError("not a complete pickle stream (no STOP opcode)")


_NEVER_STR = frozenset(
    {
        _WRAPPER,
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)
"""Factories whose results are never strings (joblib's wrapper above all: a plain unpickler reading a
joblib array's bytes meets it on top of the stack, and a STACK_GLOBAL there is an error, not an import)."""


def _could_be_str(value: Any) -> bool:
    """Whether a value could be a str when loaded (a call result might be; literals and these cannot)."""
    if isinstance(value, str | _Global | _Persistent):
        return True
    if isinstance(value, _Obj):
        never = isinstance(value.factory, _Global) and value.factory.dotted in _NEVER_STR
        return not (never or _is_array_wrapper(value))
    return False


def _callable(value: Any, pos: int | None) -> Any:
    """What REDUCE/NEWOBJ/OBJ call must come from an import or a call: an unpickler fails on anything else."""
    if not isinstance(value, _Global | _Obj | _Persistent):
        raise _WalkError(f"calls a value that is not callable at byte {pos}")
    return value


def _record(result: _Walk, module: str, name: str, proto: int) -> _Global:
    if result.probe_modules is not None and not _could_import(module, name, result.probe_modules):
        raise _WalkError("imports a name no unpickler could import")
    result.raw.add((module, name))
    effective = _py3_name(module, name) if proto < 3 else (module, name)
    result.effective.add(effective)
    return _Global(*effective)


def _pop(stack: list[Any]) -> Any:
    if not stack or stack[-1] is _MARK:
        raise _WalkError("pops more values than the stack holds (malformed pickle)")
    return stack.pop()


def _top(stack: list[Any]) -> Any:
    if not stack or stack[-1] is _MARK:
        raise _WalkError("reads a value from an empty stack (malformed pickle)")
    return stack[-1]


def _pop_mark(stack: list[Any]) -> list[Any]:
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is _MARK:
            items = stack[index + 1 :]
            del stack[index:]
            return items
    raise _WalkError("uses a MARK it never set (malformed pickle)")


def _generic(stack: list[Any], opcode: Any) -> None:
    import pickletools

    for item in reversed(opcode.stack_before):
        if item is pickletools.stackslice:
            _pop_mark(stack)
        elif item is not pickletools.markobject:
            _pop(stack)
    for item in opcode.stack_after:
        stack.append(_MARK if item is pickletools.markobject else _UNKNOWN)


def _dict_from(keys: Iterable[Any], values: Iterable[Any]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    _set_items(result, keys, values)
    return result


def _set_items(target: Any, keys: Iterable[Any], values: Iterable[Any]) -> None:
    if not isinstance(target, dict):
        return
    for key, value in zip(keys, values, strict=False):
        try:
            target[key] = value
        except TypeError:  # an unhashable symbolic key: the walker does not need it
            continue


def _build(target: _Obj, state: Any) -> None:
    """BUILD without __setstate__ merges a dict state (and slot state) into the object's attributes."""
    target.state = state
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    for part in parts:
        if isinstance(part, dict):
            target.attrs.update(part)
        elif part is not None:
            target.attrs_known = False


def _is_array_wrapper(obj: _Obj) -> bool:
    """Whether joblib's unpickler treats this object as a NumpyArrayWrapper (protocol 2+ or 0/1)."""
    factory = obj.factory
    if isinstance(factory, _Global) and factory.dotted == _WRAPPER:
        return True
    if isinstance(factory, _Global) and factory.dotted == "copyreg._reconstructor":
        args = obj.args
        return (
            isinstance(args, tuple)
            and bool(args)
            and isinstance(args[0], _Global)
            and args[0].dotted == _WRAPPER
        )
    return False


def _skip_array(
    handle: IO[bytes], size: int, wrapper: _Obj, result: _Walk, memo: dict[Any, Any], depth: int
) -> None:
    """Skip the array bytes joblib's NumpyArrayWrapper.read_array would read, exactly as it reads them.

    Object-dtype arrays are a nested pickle stream (walked with a fresh stack and memo, as joblib's inner
    Unpickler has); other dtypes are an optional padding byte plus that many bytes of padding (when the
    wrapper has numpy_array_alignment_bytes), then count * itemsize raw bytes.
    """
    if not wrapper.attrs_known:
        raise _WalkError("a joblib array wrapper with a state the walker cannot read: cannot skip its bytes")
    shape, dtype = wrapper.attrs.get("shape"), wrapper.attrs.get("dtype")
    if not isinstance(shape, tuple | list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise _WalkError("a joblib array wrapper without a readable shape: cannot skip its bytes")
    hasobject, itemsize = _dtype_layout(dtype)
    if result.arrays == 0 and depth == 0 and not hasobject:
        import pickletools

        peek = handle.read(1)
        handle.seek(-len(peek), 1)
        result.exposed = bool(peek) and peek.decode("latin-1") in pickletools.code2op
    result.arrays += 1
    if hasobject:
        if depth >= 8:
            raise _WalkError("joblib object arrays nested too deeply to follow")
        _walk_one(handle, size, result, {}, joblib=False, depth=depth + 1)
        return
    if wrapper.attrs.get("numpy_array_alignment_bytes") is not None:
        padding = handle.read(1)
        if not padding:
            raise _WalkError("a joblib array is cut short (no padding byte)")
        _skip(handle, size, padding[0])
    count = 1
    for n in shape:
        count *= n
    _skip(handle, size, count * itemsize)


def _skip(handle: IO[bytes], size: int, nbytes: int) -> None:
    if handle.tell() + nbytes > size:
        raise _WalkError("a joblib array is cut short (the file ends inside its bytes)")
    handle.seek(nbytes, 1)


def _dtype_layout(dtype: Any) -> tuple[bool, int]:
    """(hasobject, itemsize) of a pickled numpy.dtype, read from its reduce arguments and state.

    numpy pickles a dtype as ``numpy.dtype(('f8', False, True))`` plus a BUILD state tuple whose index 5 is
    the element size of flexible types (-1 otherwise) and index 7 the flags (bit 0: holds objects).
    """
    if not (
        isinstance(dtype, _Obj)
        and isinstance(dtype.factory, _Global)
        and dtype.factory.dotted
        in ("numpy.dtype", "numpy.core.multiarray.dtype", "numpy._core.multiarray.dtype")
        and isinstance(dtype.args, tuple)
        and dtype.args
        and isinstance(dtype.args[0], str)
    ):
        raise _WalkError("a joblib array wrapper without a readable dtype: cannot skip its bytes")
    code = dtype.args[0]
    state = dtype.state if isinstance(dtype.state, tuple) else ()
    elsize = state[5] if len(state) > 5 and isinstance(state[5], int) else -1
    flags = state[7] if len(state) > 7 and isinstance(state[7], int) else 0
    hasobject = code.startswith("O") or bool(flags & 1)
    if elsize > 0:
        return hasobject, elsize
    digits = code.lstrip("<>|=")[1:]
    if code.lstrip("<>|=")[:1].isalpha() and digits.isdigit():
        return hasobject, int(digits)
    raise _WalkError("a joblib array with a dtype the walker cannot size: cannot skip its bytes")


# --- zips -----------------------------------------------------------------------------------------------


def _scan_zip(handle: IO[bytes], policy: ScanPolicy, depth: int, disk_path: Path | None) -> _Verdict:
    """skops (schema.json), PyTorch (<prefix>/data.pkl) or any other zip, member by member."""
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return _fail("zip", f"an unreadable zip ({type(exc).__name__})")
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        names = {info.filename for info in members}
        if "schema.json" in names:
            skops = _scan_skops(archive, handle, policy, disk_path)
            # skops reads schema.json and .npy arrays without pickle; a pickle member is scanned anyway
            extra = [info for info in members if _pickle_member(archive, info)]
            return _merge("skops", skops, _scan_members(archive, extra, policy, depth))
        if any(PurePosixPath(name).name == "data.pkl" for name in names):
            # torch unpickles the .pkl members; data/<n> members are raw tensor bytes it never unpickles
            pickles = [info for info in members if _pickle_member(archive, info)]
            return _merge("pytorch-zip", None, _scan_members(archive, pickles, policy, depth))
        if depth >= MAX_ZIP_DEPTH:
            return _fail("zip", f"zips nested more than {MAX_ZIP_DEPTH} deep are not followed")
        return _merge("zip", None, _scan_members(archive, members, policy, depth))


def _pickle_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """A member named like a pickle or starting with a protocol 2+ PROTO opcode."""
    if PurePosixPath(info.filename).suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with archive.open(info) as member:
            return member.read(1) == b"\x80"
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, zlib.error):
        # Encrypted, compressed in a way zipfile cannot read, or corrupt: scanning it reports the failure.
        return True


def _scan_members(
    archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], policy: ScanPolicy, depth: int
) -> list[tuple[str, _Verdict]]:
    verdicts = []
    for info in members:
        name = _show(info.filename)
        if info.flag_bits & 0x1:
            verdicts.append((name, _fail("zip", "encrypted member: cannot be scanned")))
            continue
        if info.file_size > MAX_STREAM_BYTES:
            verdicts.append((name, _fail("zip", f"member larger than {MAX_STREAM_BYTES} bytes")))
            continue
        with tempfile.TemporaryFile(prefix="modelops-filescan-") as temp:
            try:
                copied = _copy_bounded(archive, info, temp)
            except Exception as exc:
                verdicts.append((name, _fail("zip", f"member cannot be read ({type(exc).__name__})")))
                continue
            suffix = PurePosixPath(info.filename).suffix.lower()
            verdicts.append((name, _scan_stream(temp, copied, suffix, policy, depth + 1)))
    return verdicts


def _copy_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, temp: IO[bytes]) -> int:
    total = 0
    with archive.open(info) as member:
        while chunk := member.read(_CHUNK):
            total += len(chunk)
            if total > MAX_STREAM_BYTES:
                raise OverflowError("member inflates beyond the limit")
            temp.write(chunk)
    temp.seek(0)
    return total


def _merge(fmt: str, first: _Verdict | None, members: list[tuple[str, _Verdict]]) -> _Verdict:
    verdicts = ([("", first)] if first else []) + members
    failed = [f"{name}: {v.detail}" if name else v.detail for name, v in verdicts if not v.passed]
    imports = tuple(sorted({imp for _, v in verdicts for imp in v.imports}))
    scanner = ", ".join(sorted({v.scanner for _, v in verdicts if v.scanner}))
    if failed:
        return _Verdict(fmt, False, "; ".join(failed), imports, scanner)
    kinds: dict[str, int] = {}
    for _, verdict in members:
        kinds[verdict.format] = kinds.get(verdict.format, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "no members to scan"
    if first is not None and not members:
        return _Verdict(fmt, True, first.detail, imports, scanner)
    head = f"{first.detail}; " if first else ""
    return _Verdict(fmt, True, f"{head}members scanned: {summary}", imports, scanner)


def _scan_skops(
    archive: zipfile.ZipFile, handle: IO[bytes], policy: ScanPolicy, disk_path: Path | None
) -> _Verdict:
    """skops' own reading of the types the file would construct, minus the reviewed ones."""
    scanner = "skops.io.get_untrusted_types"
    try:
        from skops.io import get_untrusted_types

        if disk_path is not None:
            untrusted = get_untrusted_types(file=disk_path)
        else:
            handle.seek(0)
            size = handle.seek(0, 2)
            if size > MAX_PICKLESCAN_BYTES:
                return _fail("skops", f"a nested skops file above {MAX_PICKLESCAN_BYTES} bytes", scanner)
            handle.seek(0)
            untrusted = get_untrusted_types(data=handle.read())
    except Exception as exc:
        return _fail("skops", f"an unreadable skops file ({type(exc).__name__})", scanner)
    types = tuple(sorted({_show(t) for t in untrusted}))
    trusted = set(policy.skops_trusted_types)
    unreviewed = sorted({_show(t) for t in untrusted if t not in trusted})
    if unreviewed:
        return _Verdict(
            "skops", False, f"skops file holds unreviewed types: {', '.join(unreviewed)}", types, scanner
        )
    return _Verdict(
        "skops", True, f"skops file: {len(types)} non-default types, all reviewed", types, scanner
    )
