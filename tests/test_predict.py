"""`mtl predict` end to end: models registered in a real SQLite store, MultiMNIST-dense images
written as PNG files, the CLI's outputs compared with ``mlflow.pyfunc`` on the same pixels."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from mtl.cli import main  # noqa: E402
from mtl.config import DataConfig, ModelConfig, MoEConfig  # noqa: E402
from mtl.data import multimnist  # noqa: E402
from mtl.models import build_model  # noqa: E402
from mtl.tasks import CLASSIFICATION, TaskSet, TaskSpec  # noqa: E402
from mtl.tracking.registry import register_fixed_model  # noqa: E402

IMAGES = 100
NAME, ROUTED = "multimnist-predict", "routed-predict"
DOMAINS = TaskSet(
    "toy-digits",
    (TaskSpec("digit", CLASSIFICATION, 10, "accuracy", True),),
    in_channels=3,
    image_size=16,
    domains=("a", "b", "c"),
)


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_root, one_thread):
    """A hard-sharing model on all five MultiMNIST-dense heads (random weights: the test is
    about the plumbing) and a routed multi-domain MoE, registered as ``mtl register`` does."""
    from mtl.prune import fix_moe

    tmp = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("predict", artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    data = DataConfig(train_size=512, val_size=64, seed=0, root=str(data_root), download=False)
    taskset = multimnist.taskset(data)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="hard_sharing", width=8, depth=2), taskset).eval()
    images = multimnist.build(data)["train"]["image"][:IMAGES]  # uint8 (100, 1, 36, 36)
    example = torch.from_numpy(images[:8]).float() / 255
    register_fixed_model(uri, run_id, model, example, taskset, name=NAME, tags={})
    routed = build_model(
        ModelConfig(name="moe", width=8, depth=2, moe=MoEConfig(num_experts=4, top_k=2)), DOMAINS
    ).eval()
    register_fixed_model(
        uri, run_id, fix_moe(routed), torch.rand(6, 3, 16, 16), DOMAINS, name=ROUTED, tags={},
        domain=torch.tensor([0, 1, 2, 0, 1, 2]),
    )  # fmt: skip
    # 100 MultiMNIST-dense images as PNG: 60 in the folder, 40 in a subfolder.
    folder = tmp / "images"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        where = folder if i < 60 else folder / "sub"
        Image.fromarray(image[0]).save(where / f"{i:03d}.png")
    return SimpleNamespace(uri=uri, tmp=tmp, folder=folder, images=images, taskset=taskset)


def _pyfunc(uri: str, model_uri: str):
    mlflow.set_registry_uri(uri)  # conftest restores it after the test
    return mlflow.pyfunc.load_model(model_uri)


def _decode(path: Path, mode: str) -> np.ndarray:
    """The pixels of one file as the model takes them, independently of mtl.predict: times
    float32(1 / 255) as mtl/data/dataset.py feeds training (x / 255 differs in the last bit)."""
    pixels = np.asarray(Image.open(path).convert(mode), dtype=np.float32) * np.float32(1 / 255)
    return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_predictions_equal_the_pyfunc_s(store, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", f"models:/{NAME}@candidate", str(store.folder), "--out", str(out)]
    start = time.perf_counter()
    assert main([*argv, "--tracking-uri", store.uri, "--batch-size", "32"]) == 0
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    assert f"predicted {IMAGES} images" in captured.out
    assert f"{IMAGES}/{IMAGES}" in captured.err  # the progress bar's last state
    lines = _lines(out)
    files = [Path(line["file"]) for line in lines]
    # A folder is read recursively, in sorted path order: 000..059, then sub/060..099.
    assert files == sorted(store.folder.rglob("*.png")) and len(files) == IMAGES
    x = np.stack([_decode(f, "L") for f in files])  # (100, 1, 36, 36)
    assert np.array_equal(np.round(x * 255), store.images.astype(np.float32))  # PNG: lossless
    model = _pyfunc(store.uri, f"models:/{NAME}@candidate")
    # The same batches of 32 as the CLI's (float32 maths can differ with the batch size), and
    # one call on all 100.
    batched = {h: np.concatenate([model.predict(x[i : i + 32])[h] for i in range(0, 100, 32)])
               for h in store.taskset.loss_keys}  # fmt: skip
    whole = model.predict(x)
    diffs, whole_diffs = {}, {}
    for head in ("left", "right"):
        got = np.array([line[head]["probabilities"] for line in lines])
        logits = np.array([line[head]["logits"] for line in lines])
        for expected, into in ((batched, diffs), (whole, whole_diffs)):
            probabilities = torch.softmax(torch.from_numpy(expected[head]).double(), dim=1)
            into[head] = float(np.abs(got - probabilities.numpy()).max())
            into[f"{head}_logits"] = float(np.abs(logits - expected[head]).max())
        classes = [line[head]["class"] for line in lines]
        assert classes == batched[head].argmax(axis=1).tolist()
    for head in ("semseg", "depth", "recon_left"):
        maps = np.stack([np.load(out / line[head]["npy"]) for line in lines])
        assert maps.dtype == np.float32 and maps.shape == whole[head].shape
        diffs[head] = float(np.abs(maps - batched[head]).max())
        whole_diffs[head] = float(np.abs(maps - whole[head]).max())
        picture = np.asarray(Image.open(out / lines[-1][head]["png"]))
        assert picture.shape == ((36, 36, 3) if head == "semseg" else (36, 36))
    assert max(diffs.values()) < 1e-12 and max(whole_diffs.values()) < 1e-5, (diffs, whole_diffs)
    assert lines[-1]["semseg"]["npy"] == "semseg/sub/099.npy"
    assert max(diffs.values()) < 1e-12, diffs
    print(f"\nmtl predict, {IMAGES} images: {seconds:.1f} s (model load included)")
    print(f"max |mtl predict - pyfunc| per head, same batches of 32: {diffs}")
    print(f"max |mtl predict - pyfunc| per head, pyfunc on all 100 at once: {whole_diffs}")


def test_wrong_size_is_refused_naming_the_file_before_anything_is_written(store, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(store.images[i, 0]).save(folder / f"good{i}.png")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(folder / "wide.png")
    out = tmp_path / "out"
    argv = ["predict", f"models:/{NAME}/1", str(folder), "--out", str(out)]
    err = _refused(capsys, [*argv, "--tracking-uri", store.uri])
    assert str(folder / "wide.png") in err and "40 wide x 30 high" in err, err
    assert "36 wide x 36 high, 1 channel" in err and "good0" not in err, err
    assert not out.exists()
    print(err.strip())


def test_files_as_inputs_and_a_jpeg(store, tmp_path, capsys):
    """Files given one by one keep their order and are named by their stem; a JPEG (lossy)
    and an RGB PNG are read as grey like the model takes them."""
    jpeg, rgb = tmp_path / "b.jpg", tmp_path / "a.png"
    Image.fromarray(store.images[0, 0]).save(jpeg, quality=95)
    Image.fromarray(np.repeat(store.images[1, 0, :, :, None], 3, axis=2)).save(rgb)
    out = tmp_path / "out"
    argv = ["predict", f"models:/{NAME}@candidate", str(jpeg), str(rgb), "--out", str(out)]
    assert main([*argv, "--tracking-uri", store.uri, "-q"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no progress bar
    lines = _lines(out)
    assert [line["file"] for line in lines] == [str(jpeg), str(rgb)]
    assert (out / "depth" / "b.npy").is_file() and (out / "depth" / "a.png").is_file()
    x = np.stack([_decode(jpeg, "L"), _decode(rgb, "L")])
    expected = _pyfunc(store.uri, f"models:/{NAME}@candidate").predict(x)
    assert np.array_equal(np.load(out / "semseg" / "a.npy"), expected["semseg"][1])
    assert lines[0]["left"]["logits"] == expected["left"][0].astype(float).tolist()


def test_an_out_folder_inside_the_input_folder_is_not_read_back(store, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(store.images[i, 0]).save(folder / f"{i}.png")
    argv = ["predict", f"models:/{NAME}@candidate", str(folder), "--out", str(folder / "out")]
    for _ in range(2):  # the second run finds the first one's previews under out/
        assert main([*argv, "--tracking-uri", store.uri, "-q"]) == 0
        assert len(_lines(folder / "out")) == 3
    assert "predicted 3 images" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(store, tmp_path, capsys):
    base = ["predict", f"models:/{NAME}@candidate", "--tracking-uri", store.uri]
    out = ["--out", str(tmp_path / "out")]
    assert "does not exist" in _refused(capsys, [*base, str(tmp_path / "nowhere"), *out])
    (tmp_path / "empty").mkdir()
    assert "holds no bmp/jpeg/jpg/png/webp" in _refused(
        capsys, [*base, str(tmp_path / "empty"), *out]
    )
    (tmp_path / "notes.png").write_text("not an image")
    assert "not an image" in _refused(capsys, [*base, str(tmp_path / "notes.png"), *out])
    (tmp_path / "copy").mkdir()
    Image.fromarray(store.images[0, 0]).save(tmp_path / "copy" / "000.png")
    twice = [str(store.folder / "000.png"), str(tmp_path / "copy" / "000.png")]
    assert "written twice" in _refused(capsys, [*base, *twice, *out])
    err = _refused(capsys, [*base, str(store.folder), *out, "--batch-size", "0"])
    assert "--batch-size" in err
    assert "no-such-model" in _refused(
        capsys, ["predict", "models:/no-such-model@candidate", str(store.folder), *out,
                 "--tracking-uri", store.uri],
    )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_model_that_routes_by_domain_takes_domain(store, tmp_path, capsys):
    folder = tmp_path / "rgb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    model_uri = f"models:/{ROUTED}@candidate"
    base = ["predict", model_uri, str(folder), "--tracking-uri", store.uri]
    out = tmp_path / "out"
    err = _refused(capsys, [*base, "--out", str(out)])
    assert "--domain NAME" in err and "a, b, c" in err
    assert "not one of" in _refused(capsys, [*base, "--out", str(out), "--domain", "z"])
    assert main([*base, "--out", str(out), "--domain", "b"]) == 0
    capsys.readouterr()
    lines = _lines(out)
    x = np.stack([_decode(Path(line["file"]), "RGB") for line in lines])
    expected = _pyfunc(store.uri, model_uri).predict({"image": x, "domain": np.ones(5, np.int64)})
    got = np.array([line["digit"]["logits"] for line in lines])
    assert np.array_equal(got, expected["digit"].astype(float))
    other = _pyfunc(store.uri, model_uri).predict({"image": x, "domain": np.zeros(5, np.int64)})
    assert not np.allclose(other["digit"], expected["digit"])  # the domain reached the model
    plain = ["predict", f"models:/{NAME}@candidate", str(store.folder), "--out", str(out)]
    err = _refused(capsys, [*plain, "--tracking-uri", store.uri, "--domain", "a"])
    assert "does not route by domain" in err
