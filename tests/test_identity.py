"""Identity embedders: insightface ONNX recognizer numerics, dlib on a real photo, no-download errors."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")
insightface = pytest.importorskip("insightface")
onnx = pytest.importorskip("onnx")

from cig_jax.faces import identity  # noqa: E402
from cig_jax.faces.align import align_face, arcface_template, umeyama_similarity  # noqa: E402
from cig_jax.faces.backends import make_identity_embedder  # noqa: E402
from cig_jax.faces.identity import IdentityEmbedder, IdentityModelNotFoundError  # noqa: E402

# insightface.utils.face_align calls skimage's deprecated SimilarityTransform.estimate.
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

POOL = 16  # 112 / 16 = 7 -> 3 * 7 * 7 = 147 pooled features


def t1_image() -> np.ndarray:
    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def dlib_embedder():
    return make_identity_embedder("dlib")


@pytest.fixture(scope="module")
def t1_faces(dlib_embedder):
    return dlib_embedder.detect(t1_image())


def save_tiny_recognizer(path: Path, batch, seed: int = 0) -> np.ndarray:
    """ONNX: [batch, 3, 112, 112] -> AveragePool 16x16 -> flatten [batch, 147] -> MatMul -> [batch, 512]."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((3 * 7 * 7, 512)).astype(np.float32)
    # Node names avoid "Sub"/"Mul" prefixes: insightface would read those as an mxnet model
    # that normalises inside the graph, and skip its (x - 127.5) / 127.5.
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "proj_weight"], ["683"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, 512])],
        initializer=[numpy_helper.from_array(weight, "proj_weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return weight


def numpy_tiny_recognizer(crops_rgb: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The same graph in numpy on insightface's ArcFace input: RGB, (x - 127.5) / 127.5, NCHW."""
    x = (crops_rgb.astype(np.float64) - 127.5) / 127.5
    x = x.transpose(0, 3, 1, 2)  # [N, 3, 112, 112]
    n = len(x)
    pooled = x.reshape(n, 3, 7, POOL, 7, POOL).mean(axis=(3, 5))  # [N, 3, 7, 7]
    return pooled.reshape(n, -1) @ weight  # [N, 512]


@pytest.mark.parametrize("batch", ["N", 1])
def test_insightface_recognizer_matches_numpy_graph_and_is_l2_normalised(tmp_path, batch, t1_faces):
    weight = save_tiny_recognizer(tmp_path / "models" / "tiny_pack" / "tiny_r.onnx", batch)
    embedder = make_identity_embedder(
        "insightface", model_root=tmp_path, pack="tiny_pack", detector="hog", ctx_id=-1, providers=["CPUExecutionProvider"]
    )
    assert isinstance(embedder, IdentityEmbedder)
    assert embedder.name == "insightface" and embedder.embedding_dim == 512
    assert type(embedder.recognizer).__name__ == "ArcFaceONNX"  # insightface's own model_zoo routing
    assert embedder.recognizer.input_mean == 127.5 and embedder.recognizer.input_std == 127.5

    rng = np.random.default_rng(1)
    crops = np.concatenate(
        [rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8), np.stack([f.aligned_crop for f in t1_faces[:2]])]
    )
    crops[0, :, :, 0] = 255  # pure channels catch a BGR/RGB swap
    crops[0, :, :, 1:] = 0
    got = embedder.embed_crops(crops)
    raw = numpy_tiny_recognizer(crops, weight)
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert got.shape == (5, 512) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert embedder.embed_crops(crops[:0]).shape == (0, 512)


def test_recognition_only_insightface_embeds_dlib_aligned_faces(tmp_path):
    save_tiny_recognizer(tmp_path / "models" / "tiny_pack" / "tiny_r.onnx", "N")
    embedder = make_identity_embedder("auto", model_root=tmp_path, pack="tiny_pack", detector="hog", ctx_id=-1)
    assert embedder.name == "insightface"
    image = t1_image()
    faces = embedder.detect(image)
    assert len(faces) >= 5
    for face in faces:
        assert face.aligned_crop.shape == (112, 112, 3) and face.aligned_crop.dtype == np.uint8
        assert face.embedding.shape == (512,)
        np.testing.assert_allclose(np.linalg.norm(face.embedding), 1.0, atol=1e-5)
        np.testing.assert_allclose(face.embedding, embedder.embed_crops(face.aligned_crop)[0], atol=1e-6)


def test_alignment_matches_insightface_norm_crop(t1_faces):
    cv2 = pytest.importorskip("cv2")
    from insightface.utils import face_align as insightface_align

    image = t1_image()
    for face in t1_faces:
        reference_matrix = insightface_align.estimate_norm(face.landmarks, 112)
        ours = umeyama_similarity(face.landmarks, arcface_template(112))
        np.testing.assert_allclose(ours, reference_matrix, atol=1e-4)
        crop, _ = align_face(image, face.landmarks)
        reference = cv2.warpAffine(image, reference_matrix, (112, 112), borderValue=0.0)
        assert np.abs(crop.astype(int) - reference.astype(int)).mean() < 1.0  # bilinear rounding only
        np.testing.assert_array_equal(face.aligned_crop, crop)


def test_dlib_finds_t1_faces_with_sane_landmarks(t1_faces, dlib_embedder):
    assert dlib_embedder.name == "dlib" and dlib_embedder.embedding_dim == 128
    assert len(t1_faces) >= 5
    for face in t1_faces:
        x0, y0, x1, y1 = face.box
        left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
        assert x0 <= left_eye[0] < right_eye[0] <= x1 and mouth_left[0] < mouth_right[0]
        assert y0 - 5 <= min(left_eye[1], right_eye[1]) and max(mouth_left[1], mouth_right[1]) <= y1 + 10
        # Down the face (perpendicular to the eye line, faces may be tilted): eyes, nose, mouth.
        across = (right_eye - left_eye) / np.linalg.norm(right_eye - left_eye)
        down = np.array([-across[1], across[0]])
        depth = (face.landmarks - (left_eye + right_eye) / 2) @ down
        assert abs(depth[0]) < 1 and 0 < depth[2] < depth[3] and depth[2] < depth[4]
        assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(face.embedding), 1.0, atol=1e-5)


def augment(image: np.ndarray, box, shift: tuple[int, int], brightness: float) -> np.ndarray:
    """Region around a face, shifted, horizontally flipped, brightness-scaled."""
    x0, y0, x1, y1 = box
    margin = 0.6 * (x1 - x0)
    h, w = image.shape[:2]
    top, left = int(max(0, y0 - margin + shift[1])), int(max(0, x0 - margin + shift[0]))
    bottom, right = int(min(h, y1 + margin + shift[1])), int(min(w, x1 + margin + shift[0]))
    region = image[top:bottom, left:right][:, ::-1].astype(np.float32) * brightness
    return np.ascontiguousarray(np.clip(region, 0, 255).astype(np.uint8))


def test_dlib_augmented_face_is_closest_to_itself(t1_faces, dlib_embedder):
    image = t1_image()
    gallery = np.stack([f.embedding for f in t1_faces])  # [F, 128]
    for i, face in enumerate(t1_faces):
        shift = (7, -5) if i % 2 else (-6, 4)
        query = augment(image, face.box, shift, 1.25 if i % 2 else 0.8)
        found = dlib_embedder.detect(query)
        assert found, f"face {i} not re-detected after augmentation"
        best = max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        similarity = gallery @ best.embedding
        assert int(np.argmax(similarity)) == i, (i, similarity)


def test_dlib_embed_crops_agrees_with_detect(t1_faces, dlib_embedder):
    gallery = np.stack([f.embedding for f in t1_faces])
    from_crops = dlib_embedder.embed_crops(np.stack([f.aligned_crop for f in t1_faces]))
    similarity = from_crops @ gallery.T  # [F, F]
    assert np.all(np.diag(similarity) > 0.97)
    np.testing.assert_array_equal(similarity.argmax(1), np.arange(len(t1_faces)))


def save_fake_scrfd(path: Path, face_landmarks_160: np.ndarray) -> None:
    """SCRFD-shaped ONNX (9 outputs: scores, boxes, 5-point kps at strides 8/16/32, 2 anchors) on a
    static [1, 3, 160, 160] input that always reports one face: anchor 0 of cell (2, 2) at stride 32,
    centre (64, 64), box (32, 32, 96, 96), landmarks `face_landmarks_160` [5, 2] (det-input pixels)."""
    from onnx import TensorProto, helper, numpy_helper

    outputs, initializers, nodes = {"score": [], "bbox": [], "kps": []}, [], []
    # zero = 0 * mean(input): outputs are constants, but the graph still consumes its input.
    initializers.append(numpy_helper.from_array(np.zeros((), np.float32), "zero_scale"))
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["mean"], name="reduce", keepdims=0))
    nodes.append(helper.make_node("Mul", ["mean", "zero_scale"], ["zero"], name="times_zero"))
    for stride in (8, 16, 32):
        anchors = (160 // stride) ** 2 * 2
        values = {
            "score": np.full((anchors, 1), 0.01, np.float32),
            "bbox": np.ones((anchors, 4), np.float32),
            "kps": np.zeros((anchors, 10), np.float32),
        }
        if stride == 32:
            face_anchor = (2 * 5 + 2) * 2
            values["score"][face_anchor] = 0.9
            values["kps"][face_anchor] = ((face_landmarks_160 - 64.0) / stride).ravel()
        for kind, value in values.items():
            name = f"{kind}_{stride}"
            initializers.append(numpy_helper.from_array(value, f"{name}_const"))
            nodes.append(helper.make_node("Add", [f"{name}_const", "zero"], [name], name=f"add_{name}"))
            outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes,
        "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 160, 160])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_insightface_pack_detect_runs_face_analysis_path(tmp_path, no_network):
    pack_dir = tmp_path / "models" / "fake_pack"
    weight = save_tiny_recognizer(pack_dir / "w600k_tiny.onnx", "N")
    landmarks_160 = np.array([[54, 58], [74, 58], [64, 68], [56, 78], [72, 78]], np.float32)
    save_fake_scrfd(pack_dir / "det_fake.onnx", landmarks_160)
    embedder = make_identity_embedder(
        "auto", model_root=tmp_path, pack="fake_pack", det_size=(160, 160), ctx_id=-1, providers=["CPUExecutionProvider"]
    )
    assert embedder.name == "insightface" and embedder.det_model is not None
    image = t1_image()[:320, 480:800]  # 320x320 -> SCRFD input 160x160, scale 0.5
    faces = embedder.detect(image)
    assert len(faces) == 1
    face = faces[0]
    np.testing.assert_allclose(face.box, (64, 64, 192, 192), atol=1e-3)
    np.testing.assert_allclose(face.landmarks, landmarks_160 * 2, atol=1e-3)
    np.testing.assert_array_equal(face.aligned_crop, align_face(image, face.landmarks)[0])
    raw = numpy_tiny_recognizer(face.aligned_crop[None], weight)[0]
    np.testing.assert_allclose(face.embedding, raw / np.linalg.norm(raw), atol=1e-4)
    assert no_network == []


@pytest.fixture
def no_network(monkeypatch):
    """Every insightface download entry point and socket connects raise and are recorded."""
    calls = []

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append((name, args))
            raise AssertionError(f"network access attempted via {name}")

        return fn

    import importlib

    # import_module, not `import a.b as c`: insightface.utils re-exports functions named like its submodules.
    face_analysis, model_zoo, download, storage = (
        importlib.import_module(f"insightface.{name}")
        for name in ("app.face_analysis", "model_zoo.model_zoo", "utils.download", "utils.storage")
    )

    for module, attr in [
        (download, "download_file"),
        (storage, "download_file"),
        (storage, "download"),
        (face_analysis, "ensure_available"),
        (model_zoo, "download_onnx"),
        (socket.socket, "connect"),
        (socket, "create_connection"),
    ]:
        monkeypatch.setattr(module, attr, refuse(f"{getattr(module, '__name__', module)}.{attr}"))
    return calls


def test_missing_pack_is_a_clear_error_and_never_downloads(tmp_path, no_network):
    with pytest.raises(IdentityModelNotFoundError) as error:
        make_identity_embedder("insightface", model_root=tmp_path, pack="antelopev2")
    message = str(error.value)
    assert "antelopev2" in message
    assert str(tmp_path / "models" / "antelopev2") in message
    assert "never downloads" in message

    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)  # present but empty
    with pytest.raises(IdentityModelNotFoundError, match="buffalo_l.*has no .onnx files"):
        make_identity_embedder("insightface", model_root=tmp_path, pack="buffalo_l")
    with pytest.raises(IdentityModelNotFoundError, match="never downloads"):
        make_identity_embedder("insightface", model_root=tmp_path, recognition_model=str(tmp_path / "w600k_r50.onnx"), detector="hog")

    assert make_identity_embedder("auto", model_root=tmp_path, pack="buffalo_l").name == "dlib"
    assert no_network == []


def test_pack_without_detector_says_how_to_go_recognition_only(tmp_path, no_network):
    save_tiny_recognizer(tmp_path / "models" / "rec_only" / "w600k_r50.onnx", "N")
    with pytest.raises(IdentityModelNotFoundError, match="detector='hog'"):
        make_identity_embedder("insightface", model_root=tmp_path, pack="rec_only", ctx_id=-1)
    assert no_network == []
    assert not os.path.exists(tmp_path / "models" / "rec_only.zip")
