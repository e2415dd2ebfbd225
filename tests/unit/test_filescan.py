"""The model-file scanner on real files: malicious pickles fail without running, real models pass."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import random
import struct
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from modelops.filescan import (
    DEFAULT_ALLOWED_GLOBALS,
    DEFAULT_REFUSED_GLOBALS,
    WALKER,
    FileScan,
    ScanPolicy,
    scan_file,
    scan_folder,
)

POLICY = ScanPolicy(allowed_globals=DEFAULT_ALLOWED_GLOBALS, refused_globals=DEFAULT_REFUSED_GLOBALS)


class _Payload:
    """Unpickling this runs a shell command: the scan must catch it without ever unpickling it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _scan(path: Path, policy: ScanPolicy = POLICY) -> FileScan:
    return scan_file(path, path.parent, policy)


def _assert_names_os_system(scan: FileScan) -> None:
    assert not scan.passed
    assert "posix.system" in scan.detail or "os.system" in scan.detail
    assert scan.format == "pickle"


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    return x, (x[:, 0] + x[:, 1] > 0).astype(int)


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _torch_state_dict_pickle() -> bytes:
    """What torch.save writes as archive/data.pkl for {"weight": tensor}, built by hand (no torch here)."""
    storage_id = b"(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode("0") + _unicode("cpu")
    storage_id += b"K\x04tQ"  # TUPLE, BINPERSID: torch's persistent_load supplies the storage
    tensor_args = b"(" + storage_id + b"K\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
    return (
        b"\x80\x02ccollections\nOrderedDict\n)R("
        + _unicode("weight")
        + b"ctorch._utils\n_rebuild_tensor_v2\n"
        + tensor_args
        + b"Ru."
    )


def _torch_zip(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", os.urandom(8))  # raw tensor bytes: not scanned, not loaded
        archive.writestr("archive/version", "3\n")
    return path


# --- malicious pickles --------------------------------------------------------------------------------


def test_reduce_payload_fails_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    target = tmp_path / "model.pkl"
    target.write_bytes(pickle.dumps(_Payload(marker)))

    scan = _scan(target)

    _assert_names_os_system(scan)
    assert scan.scanner.startswith("picklescan")
    assert not marker.exists()


@pytest.mark.parametrize(("protocol", "opcode"), [(0, "GLOBAL"), (4, "STACK_GLOBAL")])
def test_payload_fails_in_every_protocol(tmp_path: Path, protocol: int, opcode: str) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(marker), protocol=protocol)
    assert opcode in {op.name for op, _, _ in pickletools.genops(blob)}
    target = tmp_path / "model.pkl"
    target.write_bytes(blob)

    _assert_names_os_system(_scan(target))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickle_named_json_is_scanned_as_a_pickle(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    target = tmp_path / "input_example.json"
    target.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))

    _assert_names_os_system(_scan(target))
    assert not marker.exists()


def test_broken_text_pickle_still_fails(tmp_path: Path) -> None:
    # An unpickler runs os.system before it reaches the garbage, so a broken tail must not make it "text".
    target = tmp_path / "notes.txt"
    target.write_text(f"cposix\nsystem\n(S'touch {tmp_path / 'pwned'}'\ntR this is not a pickle any more")

    scan = _scan(target)

    assert not scan.passed
    assert scan.format == "pickle"
    assert "posix.system" in scan.detail


def test_unresolvable_stack_global_fails(tmp_path: Path) -> None:
    # STACK_GLOBAL on names computed at load time: str("posix"), str("system") with an allowed builtins.str.
    computed = (
        b"cbuiltins\nstr\n(" + _unicode("posix") + b"tR" + b"cbuiltins\nstr\n(" + _unicode("system") + b"tR"
    )
    target = tmp_path / "model.pkl"
    target.write_bytes(b"\x80\x04" + computed + b"\x93(" + _unicode("touch pwned") + b"tR.")

    scan = _scan(target)

    assert not scan.passed
    assert "cannot tell what it imports" in scan.detail
    assert scan.scanner == WALKER


def test_payload_inside_a_joblib_file_fails(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    marker = tmp_path / "pwned"
    target = tmp_path / "model.joblib"
    joblib.dump({"model": StandardScaler().fit(data[0]), "extra": _Payload(marker)}, target)

    scan = _scan(target)

    assert not scan.passed
    assert "posix.system" in scan.detail or "os.system" in scan.detail
    assert not marker.exists()


class _NoTell:
    """A write-only target without tell(): joblib then writes array bytes with no alignment padding."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")

    def flush(self) -> None:
        pass


def test_pickle_hidden_in_joblib_array_bytes_fails(tmp_path: Path) -> None:
    # joblib.load reads these bytes as a uint8 array; pickle.load reads them as opcodes and runs os.system.
    marker = tmp_path / "pwned"
    hidden = np.frombuffer(pickle.dumps(_Payload(marker), protocol=0), dtype=np.uint8)
    target_stream = _NoTell()
    joblib.dump(hidden, target_stream)
    target = tmp_path / "model.pkl"
    target.write_bytes(bytes(target_stream.data))
    assert np.array_equal(joblib.load(target), hidden)  # harmless the joblib way

    scan = _scan(target)

    assert not scan.passed
    assert "plain unpickler" in scan.detail
    assert "posix.system" in scan.detail
    assert not marker.exists()


def test_joblib_without_padding_passes(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    target_stream = _NoTell()
    joblib.dump(RandomForestClassifier(n_estimators=5, random_state=0).fit(*data), target_stream)
    target = tmp_path / "model.joblib"
    target.write_bytes(bytes(target_stream.data))

    scan = _scan(target)

    assert scan.passed, scan.detail


def test_global_outside_the_allow_list_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.pkl"
    target.write_bytes(pickle.dumps(Path("x")))  # pathlib is harmless here, but nobody reviewed it

    scan = _scan(target)

    assert not scan.passed
    assert "outside the allow-list" in scan.detail
    assert "pathlib.PosixPath" in scan.detail


def test_refusal_wins_over_allow_and_wildcards_do_not_walk_attributes(tmp_path: Path) -> None:
    # "numpy.testing._private.utils.runstring" is exec; a protocol-4 dotted name walks attributes.
    target = tmp_path / "model.pkl"
    target.write_bytes(
        b"\x80\x04" + _unicode("numpy") + _unicode("testing._private.utils.runstring") + b"\x93."
    )
    policy = ScanPolicy(allowed_globals=("numpy.*",), refused_globals=())
    assert not _scan(target, policy).passed  # dotted name: "numpy.*" does not admit it

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(b"\x80\x04" + _unicode("numpy") + _unicode("load") + b"\x93.")
    assert _scan(plain, ScanPolicy(allowed_globals=("numpy.*",), refused_globals=())).passed
    refused = _scan(plain, ScanPolicy(allowed_globals=("numpy.*",), refused_globals=("*.load",)))
    assert not refused.passed
    assert "refused" in refused.detail


# --- real models pass ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("xz", 3)])
def test_joblib_sklearn_models_pass(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], compress: int | tuple[str, int]
) -> None:
    x, y = data
    models = {
        "forest": RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y),
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y),
    }
    for name, model in models.items():
        target = tmp_path / f"{name}.joblib"
        joblib.dump(model, target, compress=compress)

        scan = _scan(target)

        assert scan.passed, scan.detail
        assert scan.format == "joblib"
        assert scan.scanner == WALKER  # picklescan cannot parse joblib's raw numpy buffers
        assert "raw numpy buffers skipped" in scan.detail
        assert "joblib.numpy_pickle.NumpyArrayWrapper" in scan.imports


def test_joblib_with_unusual_arrays_passes(tmp_path: Path) -> None:
    target = tmp_path / "arrays.joblib"
    joblib.dump(
        {
            "objects": np.array([1, "a", None], dtype=object),  # a nested pickle stream
            "strings": np.array(["ab", "c"]),
            "dates": np.datetime64("2020-01-01") + np.arange(3),
            "fortran": np.zeros((3, 4), order="F"),
            "empty": np.zeros((0,)),
            "structured": np.zeros(3, dtype=[("a", "f8"), ("b", "i4")]),
        },
        target,
    )

    scan = _scan(target)

    assert scan.passed, scan.detail
    assert "6 raw numpy buffers skipped" in scan.detail


def test_plain_pickle_of_sklearn_model_passes_with_picklescan(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = data
    target = tmp_path / "model.pkl"
    target.write_bytes(pickle.dumps(make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)))

    scan = _scan(target)

    assert scan.passed, scan.detail
    assert scan.format == "pickle"
    assert scan.scanner == "picklescan 1.0.5"
    assert "sklearn.pipeline.Pipeline" in scan.imports


def test_skops_file_needs_every_type_reviewed(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    import skops.io

    x, y = data
    target = tmp_path / "model.skops"
    skops.io.dump(HistGradientBoostingClassifier(max_iter=3).fit(x, y), target)

    refused = _scan(target)
    assert not refused.passed
    assert refused.format == "skops"
    assert "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor" in refused.detail
    assert refused.scanner == "skops.io.get_untrusted_types"

    reviewed = ScanPolicy(skops_trusted_types=tuple(skops.io.get_untrusted_types(file=target)))
    assert _scan(target, reviewed).passed


def test_unreadable_skops_file_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.skops"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("schema.json", "{not json")

    scan = _scan(target)

    assert not scan.passed
    assert scan.format == "skops"


def test_pytorch_zip(tmp_path: Path) -> None:
    state_dict = _torch_state_dict_pickle()
    assert "BINPERSID" in {op.name for op, _, _ in pickletools.genops(state_dict)}  # a well-formed pickle

    scan = _scan(_torch_zip(tmp_path / "weights.pt", state_dict))
    assert scan.passed, scan.detail
    assert scan.format == "pytorch-zip"
    assert "torch._utils._rebuild_tensor_v2" in scan.imports

    no_torch = ScanPolicy(
        allowed_globals=("collections.OrderedDict",), refused_globals=DEFAULT_REFUSED_GLOBALS
    )
    assert not _scan(tmp_path / "weights.pt", no_torch).passed

    marker = tmp_path / "pwned"
    evil = _scan(_torch_zip(tmp_path / "evil.pt", pickle.dumps(_Payload(marker))))
    assert not evil.passed
    assert "archive/data.pkl" in evil.detail
    assert "posix.system" in evil.detail or "os.system" in evil.detail
    assert not marker.exists()


def test_plain_zip_members_are_scanned(tmp_path: Path) -> None:
    target = tmp_path / "bundle.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("README.md", "# a model\n")
        archive.writestr("inner/notes.json", pickle.dumps(_Payload(tmp_path / "pwned"), protocol=0))

    scan = _scan(target)

    assert not scan.passed
    assert scan.format == "zip"
    assert "inner/notes.json" in scan.detail


# --- unreadable, unknown, text, links -----------------------------------------------------------------


def test_truncated_pickle_fails_as_unparseable(tmp_path: Path) -> None:
    target = tmp_path / "model.pkl"
    target.write_bytes(b"\x80\x04" + random.Random(7).randbytes(256))

    scan = _scan(target)

    assert not scan.passed
    assert scan.format == "pickle"
    assert "not a readable pickle" in scan.detail


def test_truncated_joblib_fails(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    target = tmp_path / "model.joblib"
    joblib.dump(RandomForestClassifier(n_estimators=3).fit(*data), target)
    target.write_bytes(target.read_bytes()[:-100])

    assert not _scan(target).passed


def test_unknown_binary_fails(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(range(256)))

    scan = _scan(target)

    assert not scan.passed
    assert scan.format == "binary"
    assert "not a format the gate knows" in scan.detail


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (
            "MLmodel",
            "artifact_path: model\nflavors:\n  python_function:\n    loader_module: mlflow.sklearn\n",
        ),
        ("conda.yaml", "channels:\n- conda-forge\ndependencies:\n- python=3.11\n"),
        ("requirements.txt", "scikit-learn==1.9.1\nskops\n"),
        ("requirements-unpinned.txt", "cloudpickle\nnumpy\n"),  # reads as GLOBAL "loudpickle numpy"
        ("input_example.json", '{"columns": ["a"], "data": [[1.0]]}'),
        ("README.md", "# Model\n\nA café menu model.\n"),
        ("empty.txt", ""),
    ],
)
def test_text_passes(tmp_path: Path, name: str, content: str) -> None:
    target = tmp_path / name
    target.write_text(content, encoding="utf-8")

    scan = _scan(target)

    assert scan.passed, scan.detail
    assert scan.format == "text"


def test_symlinks_fail_and_are_not_followed(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    (folder / "link.pkl").symlink_to(outside / "evil.pkl")
    (folder / "linked-dir").symlink_to(outside)

    scans = {scan.path: scan for scan in scan_folder(folder, POLICY)}

    assert sorted(scans) == ["MLmodel", "link.pkl", "linked-dir"]
    assert scans["MLmodel"].passed
    for name in ("link.pkl", "linked-dir"):
        assert not scans[name].passed
        assert scans[name].format == "symlink"


def test_folder_scan_is_recursive_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b" / "m.bin").write_bytes(b"\x00\xff\x00\xfe")

    scans = scan_folder(tmp_path, POLICY)

    assert [scan.path for scan in scans] == ["a.txt", "b/c/z.txt", "b/m.bin"]
    assert [scan.passed for scan in scans] == [True, True, False]


# --- a real MLflow model ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Hint. Inferred schema contains integer:UserWarning")
def test_mlflow_skops_model_folder_passes(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    import mlflow.sklearn
    import pandas as pd
    import skops.io

    x, y = data
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    model = make_pipeline(StandardScaler(), HistGradientBoostingClassifier(max_iter=3)).fit(frame, y)
    probe = tmp_path / "probe.skops"
    skops.io.dump(model, probe)
    trusted = skops.io.get_untrusted_types(file=probe)
    assert trusted  # the model holds types skops does not trust by default
    folder = tmp_path / "model"
    mlflow.sklearn.save_model(
        model,
        str(folder),
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=trusted,
        input_example=frame.head(3),
        pip_requirements=["scikit-learn", "skops"],
    )

    scans = scan_folder(folder, ScanPolicy(skops_trusted_types=tuple(trusted)))

    names = {scan.path for scan in scans}
    assert {"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "model.skops"} <= names
    assert "input_example.json" in names
    failed = [f"{scan.path}: {scan.detail}" for scan in scans if not scan.passed]
    assert not failed
    formats = {scan.path: scan.format for scan in scans}
    assert formats["model.skops"] == "skops"
    assert formats["MLmodel"] == "text"
