"""Face identity embedders: detection, 5-point ArcFace alignment, identity embedding.

Owns: the `Face` record, the `IdentityEmbedder` interface and its two backends' embedders and loaders
(`load_insightface`, `load_dlib`, and `auto_backend`: which of the two 'auto' means).

- insightface (real runs): an insightface model pack on local disk
  (`<model_root>/models/<pack>/*.onnx`, e.g. buffalo_l or antelopev2) gives
  SCRFD detection + a 512-d ArcFace embedding. A recognition-only setup pairs
  one ArcFace ONNX (e.g. w600k_r50.onnx) with dlib's detector (`detector='hog'`).
  Nothing is ever downloaded: a missing pack is an `IdentityModelNotFoundError`
  raised before insightface is called.
- dlib (offline default): HOG or CNN (mmod) detection, dlib's 5-point landmarks
  and its 128-d ResNet embedding, with weights from the `face-recognition-models`
  package.

Images are RGB uint8 [H, W, 3]; embeddings are float32 and L2-normalised.
Does not own: the list of backends, their widths and extras, or picking one by name (`faces/backends.py`:
`make_identity_embedder`); alignment maths (`faces/align.py`), how identity embeddings become
DiT identity tokens (`models/dit.py`), identity-similarity metrics (`eval/`),
face tracking in videos (`data/video.py`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from cig_jax.faces.align import align_face, arcface_template

CROP_SIZE = 112
DLIB_WEIGHT_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}
# dlib's 5-point model marks the base of the nose; ArcFace marks the tip, about
# 0.2 inter-eye distances closer to the eye line (measured with dlib's 68-point
# model on insightface's t1.jpg).
NOSE_BASE_TO_TIP = 0.2
# Where dlib's HOG box falls in an ArcFace 112 crop (mapped through the
# alignment on t1.jpg): centre ~(56, 68), side ~86. Used to place the landmark
# search when embedding already-aligned crops with dlib.
DLIB_BOX_IN_CROP_112 = (13, 25, 99, 111)
CROP_PAD = 32  # reflect-pad aligned crops: dlib's 150px chip reaches past the ArcFace crop


class IdentityModelNotFoundError(FileNotFoundError):
    """A face model file or pack is not on local disk (nothing is downloaded)."""


@dataclass
class Face:
    """One detected face. Coordinates are image pixels (x, y)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    landmarks: np.ndarray  # [5, 2] eye centres, nose tip, mouth corners (faces.align order)
    score: float  # detector confidence (backend-specific scale)
    aligned_crop: np.ndarray  # [112, 112, 3] uint8 RGB, ArcFace alignment
    embedding: np.ndarray  # [D] float32, L2-normalised identity embedding


@runtime_checkable
class IdentityEmbedder(Protocol):
    name: str
    embedding_dim: int

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 [H, W, 3] image, highest score first."""
        ...

    def embed_crops(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """[N, 112, 112, 3] uint8 RGB ArcFace-aligned crops -> [N, D] float32, L2-normalised."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _check_crops(crops, crop_size: int) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    expected = (crop_size, crop_size, 3)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != expected:
        raise ValueError(f"expected uint8 crops [N, {crop_size}, {crop_size}, 3], got {crops.dtype} {crops.shape}")
    return np.ascontiguousarray(crops)


# ----------------------------------------------------------------------------
# dlib
# ----------------------------------------------------------------------------


def dlib_weights_dir(model_dir: str | Path | None = None) -> Path:
    """Directory holding dlib's .dat weights: `model_dir`, else the face-recognition-models package."""
    if model_dir is None:
        # Located without importing: its __init__ needs pkg_resources, gone from new setuptools.
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise IdentityModelNotFoundError(
                "dlib face weights not found: `pip install face-recognition-models` (it ships "
                f"{', '.join(DLIB_WEIGHT_FILES.values())}), or pass dlib_model_dir=<dir with those files>."
            )
        model_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    return Path(model_dir)


def _dlib_weight(model_dir: Path, key: str) -> str:
    path = model_dir / DLIB_WEIGHT_FILES[key]
    if not path.is_file():
        raise IdentityModelNotFoundError(
            f"dlib weight file missing: {path}. Put {DLIB_WEIGHT_FILES[key]} there "
            "(it ships in the face-recognition-models package); nothing is downloaded."
        )
    return str(path)


def dlib_to_arcface_landmarks(points: np.ndarray) -> np.ndarray:
    """dlib 5-point shape [5, 2] -> ArcFace 5 landmarks [5, 2].

    dlib order: right-eye outer & inner corner, left-eye outer & inner corner,
    nose base (left/right in the image). The eyes become corner midpoints, the
    nose moves from base to tip, and the mouth corners (not in dlib's 5-point
    model) are placed where the ArcFace template has them relative to the eyes.
    """
    points = np.asarray(points, dtype=np.float64)
    left_eye = (points[2] + points[3]) / 2
    right_eye = (points[0] + points[1]) / 2
    eye_axis = right_eye - left_eye
    eye_distance = max(np.linalg.norm(eye_axis), 1e-6)
    x_axis = eye_axis / eye_distance
    y_axis = np.array([-x_axis[1], x_axis[0]])  # points down the face
    nose_tip = points[4] - NOSE_BASE_TO_TIP * eye_distance * y_axis
    template = arcface_template(CROP_SIZE)
    template_centre = (template[0] + template[1]) / 2
    template_distance = np.linalg.norm(template[1] - template[0])
    eye_centre = (left_eye + right_eye) / 2
    mouth = [
        eye_centre + eye_distance * (offset[0] * x_axis + offset[1] * y_axis)
        for offset in (template[3:5] - template_centre) / template_distance
    ]
    return np.stack([left_eye, right_eye, nose_tip, *mouth]).astype(np.float32)


class DlibFaceDetector:
    """dlib detection (HOG or CNN mmod) + 5-point landmarks; no embedding."""

    def __init__(self, kind: str = "hog", upsample: int = 1, model_dir: str | Path | None = None):
        import dlib

        if kind not in ("hog", "cnn"):
            raise ValueError(f"dlib detector must be 'hog' or 'cnn', got {kind!r}")
        model_dir = dlib_weights_dir(model_dir)
        self.kind, self.upsample = kind, int(upsample)
        if kind == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = dlib.cnn_face_detection_model_v1(_dlib_weight(model_dir, "cnn_detector"))
        self.shape_predictor = dlib.shape_predictor(_dlib_weight(model_dir, "landmarks"))

    def detect_shapes(self, image: np.ndarray):
        """-> list of (box, dlib 5-point full_object_detection, score), highest score first."""
        image = _check_image(image)
        if self.kind == "hog":
            rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
        else:
            found = self._detector(image, self.upsample)
            rects, scores = [d.rect for d in found], [d.confidence for d in found]
        out = []
        for rect, score in sorted(zip(rects, scores), key=lambda rs: -rs[1]):
            box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
            out.append((box, self.shape_predictor(image, rect), float(score)))
        return out

    def detect_landmarks(self, image: np.ndarray) -> list[tuple[tuple[float, ...], np.ndarray, float]]:
        """-> list of (box, ArcFace landmarks [5, 2], score)."""
        return [
            (box, dlib_to_arcface_landmarks(_shape_points(shape)), score)
            for box, shape, score in self.detect_shapes(image)
        ]


def _shape_points(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


class DlibIdentityEmbedder:
    """128-d dlib ResNet embeddings, computed on dlib's own 150px face chip."""

    name = "dlib"
    embedding_dim = 128

    def __init__(self, detector: str = "hog", upsample: int = 1, model_dir: str | Path | None = None):
        import dlib

        self._dlib = dlib
        self.detector = DlibFaceDetector(detector, upsample, model_dir)
        self.recognizer = dlib.face_recognition_model_v1(_dlib_weight(dlib_weights_dir(model_dir), "recognition"))

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _check_image(image)
        faces = []
        for box, shape, score in self.detector.detect_shapes(image):
            landmarks = dlib_to_arcface_landmarks(_shape_points(shape))
            crop, _ = align_face(image, landmarks, CROP_SIZE)
            embedding = l2_normalize(np.array(self.recognizer.compute_face_descriptor(image, shape)))
            faces.append(Face(box, landmarks, score, crop, embedding))
        return faces

    def embed_crops(self, crops) -> np.ndarray:
        """Re-finds dlib's landmarks inside each aligned crop, then embeds dlib's chip of it."""
        crops = _check_crops(crops, CROP_SIZE)
        x0, y0, x1, y1 = (v + CROP_PAD for v in DLIB_BOX_IN_CROP_112)
        rect = self._dlib.rectangle(x0, y0, x1, y1)
        out = np.zeros((len(crops), self.embedding_dim), np.float32)
        for i, crop in enumerate(crops):
            padded = np.ascontiguousarray(np.pad(crop, ((CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0)), "reflect"))
            shape = self.detector.shape_predictor(padded, rect)
            out[i] = np.array(self.recognizer.compute_face_descriptor(padded, shape))
        return l2_normalize(out)


# ----------------------------------------------------------------------------
# insightface
# ----------------------------------------------------------------------------


def insightface_pack_dir(model_root: str | Path | None, pack: str) -> Path:
    """`<model_root>/models/<pack>` (model_root defaults to insightface's ~/.insightface)."""
    root = Path(model_root if model_root is not None else "~/.insightface").expanduser()
    return (root / "models" / pack).resolve()


def insightface_pack_present(model_root: str | Path | None, pack: str) -> bool:
    pack_dir = insightface_pack_dir(model_root, pack)
    return pack_dir.is_dir() and any(pack_dir.glob("*.onnx"))


def pack_layout_mistake(model_root: str | Path | None, pack: str) -> str | None:
    """When the pack is not at `<model_root>/models/<pack>/*.onnx`: a sentence naming the common misplacements
    found on disk (the zip unpacked into its own folder, `models/` left out, the root pointing at the pack
    itself, the .onnx files loose in `models/`), or None when none of them is there either."""
    root = Path(model_root if model_root is not None else "~/.insightface").expanduser()
    want = root / "models" / pack

    def onnx(d: Path) -> bool:
        return d.is_dir() and any(d.glob("*.onnx"))

    if onnx(want / pack):
        return (f"the pack is nested one folder too deep: {want / pack}/*.onnx (unzipping {pack}.zip inside "
                f"models/{pack}/ makes models/{pack}/{pack}/); move the .onnx files up into {want}/")
    if onnx(root / pack):
        return (f"the pack is at {root / pack}/ but insightface looks in <model_root>/models/<pack>/: "
                f"move it to {want}/")
    if onnx(root):
        hint = root.parent.parent if root.parent.name == "models" else root.parent
        return (f"{root} itself holds .onnx files: --face-model-root is the folder that holds models/{pack}/, "
                f"not the pack (here that is {hint})" + ("" if root.name == pack else
                                                         f"; or move the files to {want}/"))
    if onnx(root / "models"):
        return f"the .onnx files are loose in {root / 'models'}/: put them in {want}/"
    return None


def _require_pack(model_root, pack: str) -> Path:
    pack_dir = insightface_pack_dir(model_root, pack)
    if not insightface_pack_present(model_root, pack):
        state = "has no .onnx files" if pack_dir.is_dir() else "does not exist"
        mistake = pack_layout_mistake(model_root, pack)
        raise IdentityModelNotFoundError(
            f"insightface model pack '{pack}' not found: {pack_dir} {state}"
            + (f"; {mistake}. " if mistake else ". ")
            + f"Put the pack's .onnx files there (<model_root>/models/{pack}/, e.g. buffalo_l: det_10g.onnx + "
            "w600k_r50.onnx; antelopev2: scrfd_10g_bnkps.onnx + glintr100.onnx), or use backend='dlib'. "
            "cig_jax never downloads models."
        )
    return pack_dir


def _load_recognizer(pack_dir: Path, recognition_model: str | Path | None, providers):
    """ArcFace ONNX via insightface's own model_zoo.get_model on a local file."""
    from insightface.model_zoo import get_model

    if recognition_model is not None:
        path = Path(recognition_model).expanduser()
        path = path if path.is_absolute() else pack_dir / path
        if not path.is_file():
            raise IdentityModelNotFoundError(
                f"recognition model {path} not found; put an ArcFace .onnx (e.g. w600k_r50.onnx) there. "
                "cig_jax never downloads models."
            )
        candidates = [path]
    else:
        candidates = sorted(pack_dir.glob("*.onnx"))
    for path in candidates:
        # A path ending in .onnx that exists: insightface loads it, no download branch.
        model = get_model(str(path.resolve()), providers=providers)
        if model is not None and model.taskname == "recognition":
            return model
    raise IdentityModelNotFoundError(
        f"no ArcFace recognition model among {[p.name for p in candidates]} in {pack_dir}; "
        "add one (e.g. w600k_r50.onnx or glintr100.onnx). cig_jax never downloads models."
    )


class InsightFaceIdentityEmbedder:
    """ArcFace embeddings from an insightface ONNX recognizer.

    Detection comes from the pack's SCRFD model or, for a recognition-only
    setup, from a `DlibFaceDetector`; either way the recognizer sees our
    ArcFace-aligned crops.
    """

    name = "insightface"

    def __init__(self, recognizer, det_model=None, face_detector: DlibFaceDetector | None = None):
        if (det_model is None) == (face_detector is None):
            raise ValueError("give exactly one of det_model (SCRFD) and face_detector (dlib)")
        self.recognizer, self.det_model, self.face_detector = recognizer, det_model, face_detector
        self.crop_size = int(recognizer.input_size[0])
        self._batch_one = recognizer.input_shape[0] == 1  # some exports fix the batch to 1
        out_dim = recognizer.output_shape[-1]
        self.embedding_dim = int(out_dim) if isinstance(out_dim, int) else self._raw_features(
            np.zeros((1, self.crop_size, self.crop_size, 3), np.uint8)
        ).shape[-1]

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _check_image(image)
        if self.det_model is not None:
            boxes, kps = self.det_model.detect(np.ascontiguousarray(image[..., ::-1]), max_num=0)  # SCRFD wants BGR
            if kps is None:
                raise ValueError("this SCRFD model predicts no 5-point landmarks; use a *_bnkps / det_10g model")
            found = [(tuple(map(float, b[:4])), k.astype(np.float32), float(b[4])) for b, k in zip(boxes, kps)]
            found.sort(key=lambda f: -f[2])
        else:
            found = self.face_detector.detect_landmarks(image)
        if not found:
            return []
        crops = np.stack([align_face(image, landmarks, self.crop_size)[0] for _, landmarks, _ in found])
        embeddings = self.embed_crops(crops)
        return [Face(box, lm, score, crop, emb) for (box, lm, score), crop, emb in zip(found, crops, embeddings)]

    def _raw_features(self, crops: np.ndarray) -> np.ndarray:
        # insightface's get_feat takes BGR (cv2) images and swaps them to RGB itself,
        # then applies (x - input_mean) / input_std.
        bgr = [np.ascontiguousarray(c[..., ::-1]) for c in crops]
        if self._batch_one:
            return np.concatenate([self.recognizer.get_feat([c]) for c in bgr])
        return self.recognizer.get_feat(bgr)

    def embed_crops(self, crops) -> np.ndarray:
        crops = _check_crops(crops, self.crop_size)
        if len(crops) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return l2_normalize(self._raw_features(crops).reshape(len(crops), -1))


def _load_face_analysis(pack_dir: Path, providers, ctx_id: int, det_size, det_thresh: float):
    from insightface.app import FaceAnalysis

    try:
        # An existing directory as `name` makes FaceAnalysis load it in place (no download branch).
        app = FaceAnalysis(name=str(pack_dir), allowed_modules=["detection", "recognition"], providers=providers)
    except AssertionError as error:  # FaceAnalysis asserts a detection model exists
        raise IdentityModelNotFoundError(
            f"insightface pack {pack_dir} has no SCRFD detection model (e.g. det_10g.onnx). Add one, or pass "
            "detector='hog' (or 'cnn') to pair its recognition model with dlib's detector."
        ) from error
    if "recognition" not in app.models:
        raise IdentityModelNotFoundError(
            f"insightface pack {pack_dir} has no ArcFace recognition model (e.g. w600k_r50.onnx); add one."
        )
    app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)
    return app


def auto_backend(model_root: str | Path | None = None, pack: str = "buffalo_l") -> str:
    """What 'auto' means: 'insightface' when its pack has .onnx files, else 'dlib'. A pack misplaced under
    model_root (see `pack_layout_mistake`) is an error the user can fix, not a fallback."""
    if insightface_pack_present(model_root, pack):
        return "insightface"
    if model_root is not None and pack_layout_mistake(model_root, pack):
        _require_pack(model_root, pack)
    return "dlib"


def _check_detector(detector) -> None:
    if detector not in (None, "hog", "cnn"):
        raise ValueError(f"detector must be None, 'hog' or 'cnn', got {detector!r}")


def load_dlib(model_root: str | Path | None = None, pack: str = "buffalo_l", *, detector: str | None = None,
              upsample: int = 1, dlib_model_dir: str | Path | None = None, **_) -> IdentityEmbedder:
    """dlib's embedder (HOG or CNN detection, 128-d ResNet). model_root, pack and the insightface options are
    ignored (every backend's loader takes the same keywords)."""
    _check_detector(detector)
    return DlibIdentityEmbedder(detector or "hog", upsample, dlib_model_dir)


def load_insightface(
    model_root: str | Path | None = None,
    pack: str = "buffalo_l",
    *,
    detector: str | None = None,
    recognition_model: str | Path | None = None,
    upsample: int = 1,
    det_size: tuple[int, int] = (640, 640),
    det_thresh: float = 0.5,
    ctx_id: int = 0,
    providers: Sequence[str] | None = None,
    dlib_model_dir: str | Path | None = None,
) -> IdentityEmbedder:
    """An insightface embedder from the pack at `<model_root>/models/<pack>/` (model_root defaults to
    ~/.insightface); never downloads anything.

    detector: None = the pack's SCRFD; 'hog' / 'cnn' = dlib's detector, the recognition-only setup
      (`recognition_model`, else the first ArcFace model in the pack, embeds dlib-aligned crops).
    recognition_model: ArcFace .onnx path (absolute, or relative to the pack dir).
    upsample: dlib detector upsampling (1 finds faces down to ~40 px).
    det_size, det_thresh, ctx_id, providers: passed to insightface (ctx_id < 0 forces CPU).
    """
    _check_detector(detector)
    if recognition_model is not None and Path(recognition_model).expanduser().is_absolute():
        pack_dir = insightface_pack_dir(model_root, pack)  # the file alone is enough
    else:
        pack_dir = _require_pack(model_root, pack)
    if detector is not None:
        recognizer = _load_recognizer(pack_dir, recognition_model, providers)
        recognizer.prepare(ctx_id)
        return InsightFaceIdentityEmbedder(recognizer, face_detector=DlibFaceDetector(detector, upsample, dlib_model_dir))
    if recognition_model is not None:
        raise ValueError("recognition_model selects the recognition-only setup: also pass detector='hog' or 'cnn'")
    app = _load_face_analysis(pack_dir, providers, ctx_id, det_size, det_thresh)
    return InsightFaceIdentityEmbedder(app.models["recognition"], det_model=app.det_model)
