"""Evaluation of generated images: Fréchet distances (FID with InceptionV3, or features of a
classifier trained on an embedded data set), precision/recall, text-image alignment."""

from t2i_jax.evaluation.frechet import feature_stats, frechet_distance, frechet_distance_of  # noqa: F401
from t2i_jax.evaluation.precision_recall import precision_recall  # noqa: F401
from t2i_jax.evaluation.inception import (InceptionV3, convert_state_dict, load_params, make_feature_fn,  # noqa: F401
                                          preprocess, save_params)
