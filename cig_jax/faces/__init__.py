"""Faces: detection, alignment and identity embedders (insightface ArcFace packs, dlib). No JAX here.

Used by the data builders (identity per recorded person), sampling (identity of a reference photo) and
evaluation (identity similarity of a drawn face)."""
