"""Every name a checkpoint's files use, in one table: the safetensors metadata keys vitkit writes,
and the file names of model folders (vitkit's and HuggingFace's) and of training runs' folders."""

from __future__ import annotations

# safetensors metadata: key -> what it holds (JSON). `vitkit.checkpoint.read_checkpoint` parses each
# once into a field of `CheckpointFile`.
CONFIG_KEY = "vitkit.config"
PREPROCESSING_KEY = "vitkit.preprocessing"
DATA_KEY = "vitkit.data"
CLASSES_KEY = "vitkit.classes"
DELTA_KEY = "vitkit.delta"
MASKED_KEY = "vitkit.masked"
METADATA_KEYS = {
    CONFIG_KEY: "the model's ViTConfig (every vitkit weight file)",
    PREPROCESSING_KEY: "how the model expects its images (`Preprocessing.as_dict`)",
    DATA_KEY: "a training run's whole data config (its preprocessing too)",
    CLASSES_KEY: "the class names, in the order of the head's outputs",
    DELTA_KEY: "a task delta's base fingerprint and tensor counts",
    MASKED_KEY: "the MaskedConfig of a whole masked-patch pre-training model",
}

# Files of a model folder (vitkit's own or HuggingFace's).
WEIGHTS_NAME = "model.safetensors"
MODEL_CONFIG_NAME = "config.json"  # the model's config; a run folder's config.json is its experiment
PROCESSOR_NAME = "preprocessor_config.json"
SHARD_INDEX_NAME = "model.safetensors.index.json"
FOLDER_WEIGHTS = (WEIGHTS_NAME, "pytorch_model.bin")  # first found wins
# Weights of a training run's folder, the first found wins: fine-tuning's best and last, pre-training's
# encoder.
RUN_WEIGHTS = ("best.safetensors", "last.safetensors", "encoder.safetensors")
# What a single-file layout with no metadata (timm, mmpretrain, npz) keeps beside it: `m.pth.json`.
SIDECAR_SUFFIX = ".json"
